"""Launch parameters per shape: a small measured table plus a heuristic.

The tile length trades registers (the RoPE path holds K¹, K², cos and sin
tiles of block_s × H/2 in f32) against loop overhead; the number of splits
is chosen so that batch × groups × splits programs cover the GPU about
twice, with each split still walking several tiles.
"""

from __future__ import annotations

from pallas_kernels.common import KernelConfig, LatentSpec

# Programs to launch: about two waves of an H100 (132 SMs).
TARGET_PROGRAMS = 264
MIN_TILES_PER_SPLIT = 4

# (rope, bits == 16) -> (block_s, num_warps, num_stages), measured on the
# H100 by eval/bench_kernels.py --tune (see eval/results/bench_kernels_tune.md).
TABLE = {
    (True, True): (64, 4, 2),
    (True, False): (64, 4, 2),
    (False, True): (128, 4, 3),
    (False, False): (128, 4, 2),
}


def choose_config(spec: LatentSpec, *, batch: int, cache_len: int,
                  rope: bool, n_programs: int = TARGET_PROGRAMS
                  ) -> KernelConfig:
  """Kernel config for this shape; block_s divides cache_len (≥ 16)."""
  block_s, warps, stages = TABLE[(rope, spec.bits == 16)]
  while block_s > 16 and cache_len % block_s:
    block_s //= 2
  tiles = max(1, cache_len // block_s)
  want = -(-n_programs // max(1, batch * spec.groups))
  splits = max(1, min(want, tiles // MIN_TILES_PER_SPLIT))
  return KernelConfig(block_s=block_s, splits=splits, num_warps=warps,
                      num_stages=stages)
