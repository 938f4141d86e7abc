"""float8 values in two column windows (`MosaicConfig.value_halves`, v35).

Each compute WG upcasts a tile's float8 values into an f16 tile one window
of R_v wide and mixes them (p·h_v) a window at a time, so shapes whose
whole-width tile does not fit shared memory (30 % G-LRD-4, ranks of 352)
still run. On the CPU: the windows, the shared-memory accounting, the
refusals and the lowering for sm_90; on an H200 (`gpu`): the compiled
kernel against the jnp reference.
"""

import dataclasses

import jax.numpy as jnp
import pytest

from pallas_kernels.common import SMEM_BYTES, LatentSpec
from pallas_kernels.latent_attention import _mosaic_config, mosaic_gpu as mg

from kernel_tests.test_mosaic_gpu import (FP8_GPU_CASES, _fp8_spec, _lower,
                                          check_fitting, check_fp8_rows_past,
                                          gpu, needs_hopper)

# 30 % G-LRD-4 on the Llama-2-7B and Llama-3-8B shapes: ranks of 352
GLRD4_30 = [(8, 4, 1, 128, 352), (2, 4, 4, 128, 352)]


def _swizzle_tile(rank: int) -> int:
  """Columns of a 1-byte code row's swizzle tile (128, 64 or 32 bytes)."""
  return next(sw for sw in (128, 64, 32) if rank % sw == 0)


@pytest.mark.parametrize("rank", range(96, 1025, 32))
def test_value_windows_are_the_narrowest_aligned_pair(rank):
  """Against a search over every width: two windows of one width, a
  multiple of 64 narrower than R_v, together covering R_v, the second
  ending at R_v and starting on the codes' swizzle tile; the narrowest
  such width."""
  tile = _swizzle_tile(rank)
  widths = [w for w in range(64, rank, 64)
            if 2 * w >= rank and (rank - w) % tile == 0]
  if not widths:
    with pytest.raises(ValueError, match="no two windows"):
      mg.value_windows(rank)
    return
  (lo0, w0), (lo1, w1) = mg.value_windows(rank)
  assert (lo0, w0, lo1 + w1) == (0, min(widths), rank) and w1 == w0
  assert set(range(w0)) | set(range(lo1, rank)) == set(range(rank))


def test_value_windows_examples():
  """Worked by hand: 352 = 192 + 160 (the 1-byte swizzle tile is 32
  columns: the second window starts at 160 and overlaps 32 columns); 256
  splits evenly; 384 (a 128-column tile) needs 256-wide windows."""
  assert mg.value_windows(352) == ((0, 192), (160, 192))
  assert mg.value_windows(256) == ((0, 128), (128, 128))
  assert mg.value_windows(384) == ((0, 256), (128, 256))
  with pytest.raises(ValueError):
    mg.value_windows(128)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", GLRD4_30, ids=lambda c: "-".join(map(str, c)))
def test_value_halves_fit_30_percent_glrd4(case, rope):
  """The chosen 64-row tiles in one ring slot per WG: with RoPE the whole
  value tile is over the limit (Mosaic GPU counts 236,648 of 232,448
  bytes), the windows are not; the WGs' tiles shrink by 2 WGs × 64 rows ×
  (352 - 192) columns × 2 bytes."""
  spec = _fp8_spec(*case, False)
  cfg = mg.choose_config(spec, batch=1, cache_len=65536, rope=rope)
  assert not cfg.value_halves                  # not chosen (not yet compiled)
  halves = dataclasses.replace(cfg, value_halves=True)
  assert (mg.smem_bytes(spec, rope, cfg) - mg.smem_bytes(spec, rope, halves)
          == 2 * 64 * (352 - 192) * 2)
  if rope:
    assert mg.smem_bytes(spec, rope, cfg) > SMEM_BYTES
    assert "shared memory" in mg.unsupported_reason(
        spec, jnp.bfloat16, 65536, rope, cfg)
    # Mosaic GPU's own count agrees (the independent check): the whole
    # tile does not lower, the windows do
    with pytest.raises(ValueError, match="exceeds available shared memory"):
      _lower(spec, 1, 4096, rope, config=cfg)
  assert mg.unsupported_reason(spec, jnp.bfloat16, 65536, rope,
                               halves) is None
  assert "mosaic_gpu" in _lower(spec, 1, 4096, rope, config=halves).as_text()


def test_choose_config_takes_value_halves_only_where_needed(monkeypatch):
  """With CHOOSE_VALUE_HALVES (off until the compiled tests pass on a GPU)
  the rule takes the windows only where the whole tile does not fit at 64
  rows: 30 % G-LRD-4 with RoPE, not its no-RoPE path or 50 %."""
  monkeypatch.setattr(_mosaic_config, "CHOOSE_VALUE_HALVES", True)
  pick = lambda spec, rope: mg.choose_config(spec, batch=8, cache_len=65536,
                                             rope=rope)
  for case in GLRD4_30:
    spec = _fp8_spec(*case, False)
    cfg = pick(spec, True)
    assert cfg.value_halves and (cfg.block_s, cfg.stages) == (64, 2)
    assert mg.unsupported_reason(spec, jnp.bfloat16, 65536, True, cfg) is None
    assert not pick(spec, False).value_halves
  assert not pick(_fp8_spec(8, 4, 1, 128, 256, False), True).value_halves
  bf16 = LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=352, v_rank=352)
  assert not pick(bf16, True).value_halves


def test_value_halves_reasons():
  on = mg.MosaicConfig(value_halves=True)
  bf16 = LatentSpec(groups=2, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256)
  assert "float8 caches with an own value latent" in mg.unsupported_reason(
      bf16, jnp.bfloat16, 1024, True, on)
  assert "float8 caches with an own value latent" in mg.unsupported_reason(
      _fp8_spec(1, 3, 3, 64, 192, True), jnp.bfloat16, 1024, True, on)
  assert "no two windows" in mg.unsupported_reason(
      _fp8_spec(2, 2, 2, 128, 128, False), jnp.bfloat16, 1024, False, on)
  assert "values_during_scores" in mg.unsupported_reason(
      _fp8_spec(2, 4, 1, 128, 256, False), jnp.bfloat16, 1024, False,
      dataclasses.replace(on, values_during_scores=True))
  assert mg.unsupported_reason(_fp8_spec(2, 4, 1, 128, 256, False),
                               jnp.bfloat16, 1024, False, on) is None


# (G, J, Q, H, R, batch, S) and the config changes lowered with the windows
LOWER_CASES = [
    (8, 4, 1, 128, 352, 1, 4096),     # Llama-2-7B, G-LRD-4, 30 %
    (2, 4, 4, 128, 352, 1, 4096),     # Llama-3-8B, G-LRD-4, 30 %
    (2, 4, 1, 128, 256, 1, 4096),     # G-LRD-4, 50 %
    (8, 1, 1, 128, 96, 2, 1024),      # windows overlapping by 32 columns
]
VARIANTS = {"chosen": {}, "mask_per_tile": dict(fp8_mask_last=False),
            "rebuild_early": dict(rebuild_early=True),
            "upcast_scores": dict(fp8_scores=False),
            "wgs3": dict(compute_wgs=3, stages=3),
            "rows128": dict(block_s=128, stages=2)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", LOWER_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_value_halves_lower_for_sm90(case, rope, variant):
  g, j, qk, h, r, batch, s = case
  spec = _fp8_spec(g, j, qk, h, r, False)
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), value_halves=True,
      **VARIANTS[variant])
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, cfg):
    pytest.skip("does not fit")
  assert "mosaic_gpu" in _lower(spec, batch, s, rope, config=cfg).as_text()


# ------------------------------------------ GPU: compiled kernel vs reference

# (G, J, Q, H, R, shared, batch, S, lengths) as FP8_GPU_CASES
GPU_CASES = [
    FP8_GPU_CASES[1],                                      # G-LRD-4, 50 %
    FP8_GPU_CASES[4],                                      # GQA 4, 50 %
    (2, 4, 1, 128, 352, False, 2, 512, [512, 77]),         # G-LRD-4, 30 %
    (2, 1, 4, 128, 96, False, 3, 448, [448, 1, 200]),      # overlapping
]


@gpu
@needs_hopper
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=lambda c: "-".join(map(str, c[:6])))
def test_compiled_value_halves_match_reference(case, rope):
  """The chosen config with the windows, and 64-row tiles with 3 splits,
  against the reference (the same float8 codes dequantized; with RoPE the
  same e4m3 B_k)."""
  g, j, qk, h, r, shared, batch, s, lengths = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), value_halves=True)
  assert check_fitting(spec, batch, s, lengths, (
      cfg, dataclasses.replace(cfg, block_s=64, stages=2, splits=3)), rope)


@gpu
@needs_hopper
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", GPU_CASES[:3],
                         ids=lambda c: "-".join(map(str, c[:6])))
def test_compiled_value_halves_rows_past_the_length(case, rope):
  """NaN codes and infinite scales past every length change nothing: both
  windows are cleared in the last tile."""
  check_fp8_rows_past(case, rope, value_halves=True)
