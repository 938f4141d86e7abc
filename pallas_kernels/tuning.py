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

# (rope, 16-bit latents, ≥ 16 query heads per group) -> (block_s, num_warps,
# num_stages): the fastest of a sweep on the H100 at 64K context
# (eval/bench_kernels.py --tune; eval/results/bench_kernels_tune.md).
TABLE = {
    (True, True, False): (128, 8, 2),
    (True, True, True): (32, 8, 2),
    (True, False, False): (128, 8, 2),
    (True, False, True): (128, 8, 2),
    (False, True, False): (32, 4, 2),
    (False, True, True): (128, 4, 1),
    (False, False, False): (64, 4, 2),
    (False, False, True): (64, 4, 1),
}


# Hopper's opt-in shared memory per block; Ampere has less (164 KB on the
# A100), where the smaller tiles this rule picks for large ranks fit too
SMEM_BYTES = 227 * 1024


def smem_estimate(spec: LatentSpec, block_s: int, stages: int) -> int:
  """Shared memory Triton takes for a tile loop: `stages` buffers of the
  key latent tile, one of the value tile, ~24 KB of the rest. Fits the
  one overflow measured (H200, G-LRD-4 at 30 %, ranks 352, 128-row tiles,
  2 stages: Triton asked 291,072 B, this says 294,912) and the 50 % ranks
  (256) that compile at those tiles (estimate 221,184 B)."""
  per = spec.bits / 8
  return int(block_s * per * (stages * spec.k_rank + spec.v_rank)) + 24576


def choose_config(spec: LatentSpec, *, batch: int, cache_len: int,
                  rope: bool, n_programs: int = TARGET_PROGRAMS
                  ) -> KernelConfig:
  """Kernel config for this shape; block_s divides cache_len (≥ 16)."""
  block_s, warps, stages = TABLE[(rope, spec.bits == 16,
                                  spec.heads_per_group >= 16)]
  while block_s > 16 and (cache_len % block_s or smem_estimate(
      spec, block_s, stages) > SMEM_BYTES):
    block_s //= 2
  tiles = max(1, cache_len // block_s)
  want = -(-n_programs // max(1, batch * spec.groups))
  splits = max(1, min(want, tiles // MIN_TILES_PER_SPLIT))
  return KernelConfig(block_s=block_s, splits=splits, num_warps=warps,
                      num_stages=stages)
