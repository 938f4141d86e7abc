"""Triton launch parameters (pallas_kernels/tuning.py)."""

from pallas_kernels.common import LatentSpec
from pallas_kernels.tuning import SMEM_BYTES, choose_config, smem_estimate


def _glrd4(rank):
  return LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=rank, v_rank=rank)


def test_shared_memory_estimate_fits_the_h200_measurements():
  """Golden values: what Triton asked in its compile errors on the H200
  (eval/results/bench_e2e_h200_configs.md, bench_kernels_h200_palu30.md;
  the limit there was 232,448 B) for G-LRD-4 at 30 % (ranks 352)."""
  assert SMEM_BYTES == 232448
  assert smem_estimate(_glrd4(352), 128, 2, rope=True) == 291072
  assert smem_estimate(_glrd4(352), 64, 2, rope=True) == 237824
  # the 50 % ranks compile at 128-row tiles and 2 stages
  assert smem_estimate(_glrd4(256), 128, 2, rope=True) <= SMEM_BYTES


def test_large_ranks_get_smaller_tiles_then_one_stage():
  for rank in (256, 352, 448, 512):
    for rope in (True, False):
      c = choose_config(_glrd4(rank), batch=1, cache_len=65536, rope=rope)
      assert smem_estimate(_glrd4(rank), c.block_s, c.num_stages,
                           rope) <= SMEM_BYTES, (rank, rope, c)
      assert 65536 % c.block_s == 0
  # unchanged where the measured table fits
  c = choose_config(_glrd4(256), batch=1, cache_len=65536, rope=True)
  assert (c.block_s, c.num_stages) == (128, 2)
  c = choose_config(_glrd4(352), batch=1, cache_len=65536, rope=True)
  assert (c.block_s, c.num_stages) == (64, 1)
