"""Launch parameters per shape: a small measured table plus a heuristic.

The tile length trades registers (the RoPE path holds K¹, K², cos and sin
tiles of block_s × H/2 in f32) against loop overhead; the number of splits
is chosen so that batch × groups × splits programs cover the GPU about
twice, with each split still walking several tiles.
"""

from __future__ import annotations

from pallas_kernels.common import SMEM_BYTES, KernelConfig, LatentSpec

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


def smem_estimate(spec: LatentSpec, block_s: int, stages: int,
                  rope: bool) -> int:
  """Shared memory (bytes) Triton takes for a tile loop, fitted to what it
  asked on the H200 for G-LRD-4 at 30 % (ranks 352, head_dim 128, 2
  stages): 291,072 B with 128-row tiles, 237,824 B with 64 (both failed to
  compile; the limit is 232,448). With RoPE the B_k slices of a KV head
  (R × H, 16-bit) are buffered `stages` times and each tile row costs
  (R + H/2) 16-bit values; the 50 % ranks (256) come to 217,344 B at 128
  rows and 2 stages, which compile. Without RoPE (B_k folded into the
  query) `stages` latent tiles of keys and one of values."""
  if rope:
    return (stages * spec.k_rank * spec.head_dim * 2
            + block_s * (spec.k_rank + spec.head_dim // 2) * 2 + 4352)
  per = spec.bits / 8
  return int(block_s * per * (stages * spec.k_rank + spec.v_rank)) + 24576


def choose_config(spec: LatentSpec, *, batch: int, cache_len: int,
                  rope: bool, n_programs: int = TARGET_PROGRAMS
                  ) -> KernelConfig:
  """Kernel config for this shape; block_s divides cache_len (≥ 16)."""
  block_s, warps, stages = TABLE[(rope, spec.bits == 16,
                                  spec.heads_per_group >= 16)]
  while block_s > 16 and cache_len % block_s:
    block_s //= 2
  # too large for shared memory: halve the tile down to 64 rows, then drop
  # the second stage, then halve again
  while block_s > 16 and smem_estimate(spec, block_s, stages,
                                       rope) > SMEM_BYTES:
    if block_s <= 64 and stages > 1:
      stages = 1
    else:
      block_s //= 2
  tiles = max(1, cache_len // block_s)
  want = -(-n_programs // max(1, batch * spec.groups))
  splits = max(1, min(want, tiles // MIN_TILES_PER_SPLIT))
  return KernelConfig(block_s=block_s, splits=splits, num_warps=warps,
                      num_stages=stages)
