"""The Mosaic GPU latent decode kernel.

CI has no GPU, and Pallas's GPU interpret mode has no `wgmma` on the CPU, so
this file tests on the CPU (1) the plain math the kernel body calls (tile
RoPE by angle sums, the online-softmax step, the split merge), (2) the
operand builders and the launch checks, and (3) that the kernel lowers for
sm_90 (Pallas -> Mosaic GPU MLIR, every shape below), which catches API
drift. The compiled kernel is compared with the jnp reference by the tests
marked `gpu`, run on an H200 (`pytest -m gpu`, log in
eval/results/kernel_tests_h200.txt).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.absorb_attention import absorbed_queries
from pallas_kernels.common import (LatentSpec, QuantLatent, combine_splits,
                                   unrolled_combine)
from pallas_kernels.latent_attention import api, mosaic_gpu as mg
from pallas_kernels.latent_attention.reference import reference_for
from palu_jax.quantize import fp8_quant

from kernel_tests.test_latent_decode import make_inputs

ON_HOPPER = (api.compute_capability() or 0) >= 9.0
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not ON_HOPPER,
                                  reason="needs an sm_90+ GPU")
# |kernel - reference| <= TOL·max|reference|: the kernel rounds rotated keys
# and probabilities to 16 bits where the reference keeps f32
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


# ---------------------------------------------------------------- CPU: math

def test_angle_sum_gives_rope_of_the_full_position():
  """cos/sin of (s0 + i)·θ from the per-WG table (i·θ) and the per-tile row
  (s0·θ) equal the direct ones (float64, so only the identity is tested)."""
  rng = np.random.default_rng(0)
  theta = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
  i = np.arange(64)[:, None] * theta[None]
  s0 = 4096 * theta[None]
  cos, sin = mg.angle_sum(np.cos(i), np.sin(i), np.cos(s0), np.sin(s0))
  np.testing.assert_allclose(cos, np.cos(i + s0), atol=1e-12)
  np.testing.assert_allclose(sin, np.sin(i + s0), atol=1e-12)
  k1, k2 = rng.standard_normal((2, 64, 32))
  r1, r2 = mg.rotate_halves(k1, k2, cos, sin)
  # rotate-half RoPE written out: [k1, k2]·cos + [-k2, k1]·sin
  full = np.concatenate([k1, k2], -1) * np.concatenate([cos, cos], -1) + \
      np.concatenate([-k2, k1], -1) * np.concatenate([sin, sin], -1)
  np.testing.assert_allclose(np.concatenate([r1, r2], -1), full, atol=1e-12)


def test_float16_rotation_is_within_bf16_rounding():
  """The kernel's default rotation: keys rounded once to float16, angle
  sums and rotation in float16 (packed). Its error against the float64
  rotation stays below one bf16 rounding of the key (2^-8 relative), the
  rounding the float32 rotation applies to its result anyway."""
  rng = np.random.default_rng(3)
  theta = 1.0 / 10000 ** (np.arange(0, 128, 2) / 128)
  i = np.arange(64)[:, None] * theta[None]
  s0 = 123456 * theta[None]
  k1, k2 = rng.standard_normal((2, 64, 64)) * 20
  want = mg.rotate_halves(k1, k2, np.cos(i + s0), np.sin(i + s0))
  h = lambda x: jnp.asarray(x, jnp.float16)
  cos, sin = mg.angle_sum(h(np.cos(i)), h(np.sin(i)), h(np.cos(s0)),
                          h(np.sin(s0)))
  got = mg.rotate_halves(h(k1), h(k2), cos, sin)
  scale = np.hypot(k1, k2)                    # |rotated pair|
  for g, w in zip(got, want):
    err = np.abs(np.asarray(g, np.float64) - w) / scale
    assert err.max() < 2 ** -8, err.max()


def test_folded_scores_equal_scores_of_rotated_keys():
  """`rope_mode="fold"`: the scores the kernel forms from h_k·[U | V] (the
  query folded into B_k, `_fold_operands`) and the tile angles
  (`folded_scores`) equal q·RoPE(h_k·B_k + b)/√H computed the direct way
  (float32 operands, numpy float64 for the direct side), for every query
  head of every KV head, with a key bias, in a sub-tile far from 0."""
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=32,
                    k_rank=48, v_rank=64)
  q, hk, _, k_up, k_bias, inv = make_inputs(spec, 2, 64, jnp.float32)
  u, vecs = mg._fold_operands(q, k_up, k_bias, inv, spec, jnp.float32)
  g, j, qk, h, hh = 2, 2, 2, 32, 16
  assert u.shape == (2, g * j, qk, 48, h) and vecs.shape == (2, 4, 5, hh)
  np.testing.assert_array_equal(vecs[:, :, 0], np.broadcast_to(inv, (2, 4,
                                                                     hh)))
  s0 = 70000
  theta = np.asarray(inv, np.float64)
  pos = (s0 + np.arange(64))[:, None] * theta[None]            # [rows, hh]
  rows = np.arange(64)[:, None] * theta[None]
  hk64 = np.asarray(hk, np.float64).reshape(2, 64, g, 48)
  bk = np.asarray(k_up, np.float64).reshape(g, 48, j, h)
  kb = np.asarray(k_bias, np.float64).reshape(g, j, h)
  qh = np.asarray(q, np.float64).reshape(2, g, j, qk, h)
  for b in range(2):
    for x in range(g * j):
      gg, jj = divmod(x, j)
      k = hk64[b, :, gg] @ bk[gg, :, jj] + kb[gg, jj]          # [rows, H]
      r1, r2 = mg.rotate_halves(k[:, :hh], k[:, hh:], np.cos(pos),
                                np.sin(pos))
      for n in range(qk):
        want = np.concatenate([r1, r2], -1) @ qh[b, gg, jj, n] / np.sqrt(h)
        cd = hk64[b, :, gg] @ np.asarray(u[b, x, n], np.float64)
        c = cd[:, :hh] + np.asarray(vecs[b, x, 1 + 2 * n], np.float64)
        d = cd[:, hh:] + np.asarray(vecs[b, x, 2 + 2 * n], np.float64)
        got = mg.folded_scores(c, d, np.cos(rows), np.sin(rows),
                               np.cos(s0 * theta), np.sin(s0 * theta))
        np.testing.assert_allclose(got, want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("deferred_sum", [False, True],
                         ids=["sum_per_tile", "sum_deferred"])
@pytest.mark.parametrize("blocks_per_tile", [1, 2])
def test_online_softmax_steps_and_split_merge_equal_one_softmax(
    blocks_per_tile, deferred_sum):
  """Tiles of 64 or 128 rows (one or two score blocks of 64) folded by
  `softmax_step` into two interleaved partials (the two compute WGs),
  merged by `combine_splits`, equal softmax(s)·v (jax.nn.softmax). With
  the deferred sum (private reductions) l is [64, N] per-row partials,
  summed over its rows once at the end, as the kernel does."""
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.standard_normal((512, 8)) * 4, jnp.float32)  # [S, N]
  v = jnp.asarray(rng.standard_normal((512, 32)), jnp.float32)      # [S, R]
  rows_per_tile = 64 * blocks_per_tile
  tiles = 512 // rows_per_tile
  parts = []
  for wg in range(2):
    m = jnp.full((8,), -1e30, jnp.float32)
    l = jnp.zeros((64, 8) if deferred_sum else (8,), jnp.float32)
    acc = jnp.zeros((32, 8), jnp.float32)
    for t in range(wg, tiles, 2):
      starts = range(t * rows_per_tile, (t + 1) * rows_per_tile, 64)
      m, l, corr, probs = mg.softmax_step(
          m, l, [s[r:r + 64] for r in starts])
      assert len(probs) == blocks_per_tile
      acc = acc * corr[None, :]
      for r, p in zip(starts, probs):
        acc = acc + v[r:r + 64].T @ p
    if deferred_sum:
      assert l.shape == (64, 8)
      l = l.sum(axis=0)
    parts.append((acc.T, m, l))
  acc, m, l = (jnp.stack(x) for x in zip(*parts))
  got = combine_splits(acc, m, l)                              # [N, R]
  want = jax.nn.softmax(s, axis=0).T @ v
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [6, 2048], ids=["narrow", "wide"])
@pytest.mark.parametrize("rows_first", [False, True],
                         ids=["heads_rows", "rows_heads"])
@pytest.mark.parametrize("parts", [1, 3, 8, 16, 17, 32, 33, 40, 132])
def test_combine_splits_equals_softmax_over_all_parts(parts, rows_first,
                                                      width):
  """Partials of one softmax over P splits of the keys (an empty split
  included: m = -1e30, l = 0, acc = 0, as a split past the sequence end
  leaves them), merged by `combine_splits`, equal softmax(s)·v computed
  by jax.nn.softmax over all keys at once. Value widths of 6 and 2,048
  take both merge forms at 17-32 partials (`unrolled_combine`: slices up
  to 2^17 partial values, reductions above)."""
  if parts in (17, 32):
    assert unrolled_combine(parts, parts * 4 * width) == (width == 6)
  rng = np.random.default_rng(parts)
  rows = 24                                     # keys per split
  s = rng.standard_normal((parts, rows, 4)) * 5                # [P, S, M]
  v = rng.standard_normal((parts, rows, width))                # [P, S, R]
  m = s.max(axis=1)                                            # [P, M]
  e = np.exp(s - m[:, None])
  l = e.sum(axis=1)
  acc = np.einsum("psm,psr->pmr", e, v)
  empty = parts // 2 if parts > 1 else None
  if empty is not None:
    m[empty], l[empty], acc[empty] = -1e30, 0.0, 0.0
    s[empty] = -np.inf
  if rows_first:                       # the kernel's layout [P, R, M]
    acc = np.swapaxes(acc, 1, 2)
  got = combine_splits(*(jnp.asarray(x, jnp.float32) for x in (acc, m, l)),
                       rows_first=rows_first)
  assert got.shape == (4, width)
  probs = jax.nn.softmax(jnp.asarray(s.reshape(-1, 4)), axis=0)  # [P·S, M]
  want = probs.T @ jnp.asarray(v.reshape(-1, width))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
def test_merge_partials_drops_padding_columns_and_merges(rope):
  """`merge_partials` on partials in the kernel's stored layout equals,
  head by head, the merge of that head's partials written out here with
  numpy (max, weights, weighted sums), the padding columns ignored (they
  hold garbage: NaN here, so any use of them shows)."""
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=3, head_dim=64,
                    k_rank=64, v_rank=40)
  hc, nq = (2, 8) if rope else (1, 8)
  cols = hc * nq if rope else 8          # no RoPE: 6 heads of a group + pad
  b, x, parts = 2, 2, 5
  rng = np.random.default_rng(0)
  acc = rng.standard_normal((b, x, parts, 40, cols)).astype(np.float32)
  m = rng.standard_normal((b, x, parts, cols)).astype(np.float32) * 3
  l = rng.uniform(0.5, 2, (b, x, parts, cols)).astype(np.float32)
  if rope:
    real = [h * nq + i for h in range(hc) for i in range(spec.q_per_kv)]
  else:
    real = list(range(spec.heads_per_group))
  pad = [c for c in range(cols) if c not in real]
  for a in (acc, m, l):
    a[..., pad] = np.nan
  got = np.asarray(mg.merge_partials(jnp.asarray(acc), jnp.asarray(m),
                                     jnp.asarray(l), spec=spec, rope=rope,
                                     hc=hc, nq=nq))
  assert got.shape == (b, x, len(real), 40)
  for k, c in enumerate(real):
    mc, lc, ac = m[..., c], l[..., c], acc[..., c]        # [b, x, P], [.., R]
    w = np.exp(mc - mc.max(axis=-1, keepdims=True))
    want = (w[..., None] * ac).sum(axis=2) / (w * lc).sum(axis=-1)[..., None]
    np.testing.assert_allclose(got[:, :, k], want, rtol=1e-5, atol=1e-6)


def test_value_row_chunks_cover_the_rank_in_64_row_pieces():
  """p·h_v accumulates R_v rows in wgmma pieces of 64: one piece when R_v
  is a multiple of 64; else the last piece ends at R_v and overlaps."""
  assert mg.value_row_chunks(128) == ((0, 128),)
  assert mg.value_row_chunks(96) == ((0, 64), (32, 64))
  for rv in range(64, 513, 16):
    chunks = mg.value_row_chunks(rv)
    covered = np.zeros(rv, bool)
    for off, size in chunks:
      assert off % 16 == 0 and off + size <= rv and size % 64 == 0
      covered[off:off + size] = True
    assert covered.all() and chunks[-1][0] + chunks[-1][1] == rv


def test_operands():
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=3, head_dim=16,
                    k_rank=32, v_rank=64)
  q, hk, hv, k_up, k_bias, inv = make_inputs(spec, 2, 64, jnp.bfloat16)
  bk, qk, vecs, base = mg._rope_operands(q, k_up, k_bias, inv, spec, 8,
                                         jnp.bfloat16, 128)
  assert qk.shape == (2, 4, 8, 16)
  # B_k of KV head (g, j) = columns j·H.. of group g's rows
  kup = np.asarray(k_up, np.float32)
  np.testing.assert_array_equal(np.asarray(bk[1 * 2 + 1], np.float32),
                                kup[32:64, 16:32])
  # cos/sin of each sub-tile's first position (64 rows: positions 0, 64)
  np.testing.assert_allclose(base[1, 0], np.cos(64 * np.asarray(inv)),
                             rtol=1e-6)
  np.testing.assert_allclose(base[1, 1], np.sin(64 * np.asarray(inv)),
                             rtol=1e-6, atol=1e-7)
  qh = np.asarray(q, np.float32).reshape(2, 4, 3, 16)
  np.testing.assert_array_equal(np.asarray(qk[:, :, :3], np.float32), qh)
  assert not np.any(np.asarray(qk[:, :, 3:], np.float32))
  assert vecs.shape == (4, 3, 8)
  np.testing.assert_array_equal(vecs[:, 0], np.broadcast_to(inv, (4, 8)))
  qf = absorbed_queries(q, k_up, spec, 8, jnp.float32)  # no-RoPE operand
  assert qf.shape == (2, 2, 8, 32)
  # head (j, q) of group g: q · B_k[g, :, j]ᵀ / √H (float64 numpy)
  b = np.asarray(k_up, np.float64).reshape(2, 32, 2, 16)
  want = np.einsum("BGJQH,GRJH->BGJQR",
                   qh.astype(np.float64).reshape(2, 2, 2, 3, 16), b) / 4
  np.testing.assert_allclose(np.asarray(qf[:, :, :6]),
                             want.reshape(2, 2, 6, 32), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(qf[:, :, 6:]))


def test_unsupported_reasons_and_config():
  spec = LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256)
  cfg = mg.choose_config(spec, batch=1, cache_len=65536, rope=True)
  assert cfg.block_s == 64 and cfg.stages == 2 and cfg.splits >= 4
  assert mg.smem_bytes(spec, True, cfg) <= mg.SMEM_BYTES
  assert mg.unsupported_reason(spec, jnp.bfloat16, 65536, True, cfg) is None
  assert "dtype float32" in mg.unsupported_reason(spec, jnp.float32, 64,
                                                  True, cfg)
  # 4-bit with RoPE runs (v17) where the scales fill a TMA row: 64
  # latents in groups of 32 give 4-byte rows
  assert "multiple of 8" in mg.unsupported_reason(
      LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=64,
                 k_rank=64, v_rank=64, bits=4), jnp.bfloat16, 64, True, cfg)
  assert "3-bit" in mg.unsupported_reason(
      LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=64,
                 k_rank=64, v_rank=64, bits=3), jnp.bfloat16, 64, False, cfg)
  odd = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=64,
                   k_rank=96, v_rank=96)
  assert "value_pieces=False" in mg.unsupported_reason(
      odd, jnp.bfloat16, 64, True, mg.MosaicConfig(value_pieces=False))
  assert mg.unsupported_reason(odd, jnp.bfloat16, 64, True, cfg) is None
  assert "v_rank 48" in mg.unsupported_reason(
      LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=64,
                 k_rank=64, v_rank=48), jnp.bfloat16, 64, True, cfg)
  assert "cache length 100" in mg.unsupported_reason(spec, jnp.bfloat16, 100,
                                                     True, cfg)
  assert "block_s 96" in mg.unsupported_reason(
      spec, jnp.bfloat16, 4096, True, mg.MosaicConfig(block_s=96))
  # M-LRD: tiles of 128 rows fit (and are preferred); a cache length that
  # is not a multiple of 128 falls back to tiles of 64
  mlrd = LatentSpec(groups=32, kv_per_group=1, q_per_kv=1, head_dim=128,
                    k_rank=64, v_rank=64)
  for rope in (True, False):
    c = mg.choose_config(mlrd, batch=8, cache_len=65536, rope=rope)
    assert c.block_s == 128 and c.stages == 4, c
    assert mg.smem_bytes(mlrd, rope, c) <= mg.SMEM_BYTES
    assert mg.choose_config(mlrd, batch=8, cache_len=64 * 1001,
                            rope=rope).block_s == 64
  # keys are rebuilt by default (folding measured no faster, NOTES.md v9)
  assert cfg.rope_mode == "rebuild"
  gqa = LatentSpec(groups=2, kv_per_group=4, q_per_kv=4, head_dim=128,
                   k_rank=256, v_rank=256)
  assert mg.choose_config(gqa, batch=1, cache_len=4096,
                          rope=True).rope_mode == "rebuild"
  assert "rope_mode 'x'" in mg.unsupported_reason(
      mlrd, jnp.bfloat16, 4096, True, mg.MosaicConfig(rope_mode="x"))
  # folding 4 query heads into B_k needs 4 copies of it: does not fit
  assert "shared memory" in mg.unsupported_reason(
      gqa, jnp.bfloat16, 4096, True, mg.MosaicConfig(rope_mode="fold"))
  assert "compute_wgs 4" in mg.unsupported_reason(
      mlrd, jnp.bfloat16, 4096, True, mg.MosaicConfig(compute_wgs=4))
  assert "multiple of compute_wgs=3" in mg.unsupported_reason(
      mlrd, jnp.bfloat16, 4096, True, mg.MosaicConfig(compute_wgs=3,
                                                      stages=4))
  three = mg.choose_config(mlrd, batch=8, cache_len=65536, rope=True,
                           compute_wgs=3)
  assert three.compute_wgs == 3 and three.stages % 3 == 0
  assert mg.unsupported_reason(mlrd, jnp.bfloat16, 65536, True, three) is None
  # (2 WGs: 24 + 2·240 = 3·168 since the twelfth session; 232 with a
  # producer of 40 before, where ptxas spilled)
  assert mg._compute_registers(2) == 240 and mg._compute_registers(3) == 160
  big = mg.MosaicConfig(block_s=64, stages=6)
  assert "shared memory" in mg.unsupported_reason(spec, jnp.bfloat16, 4096,
                                                  True, big)


def test_api_picks_and_falls_back_on_cpu(caplog):
  spec = LatentSpec(groups=1, kv_per_group=2, q_per_kv=2, head_dim=32,
                    k_rank=64, v_rank=64)
  q = jnp.zeros((1, 4, 32), jnp.bfloat16)
  assert api.resolve(None, spec, q, 64, True) == "xla"
  with caplog.at_level("WARNING"):
    assert api.resolve("mosaic_gpu", spec, q, 64, True) == "xla"
  assert "needs an sm_90+ GPU" in caplog.text
  assert api.resolve("pallas", spec, q, 64, True) == "triton"
  with pytest.raises(ValueError, match="implementation must be one of"):
    api.resolve("cuda", spec, q, 64, True)


def test_api_picks_the_reference_for_small_calls_on_hopper(monkeypatch):
  """On an sm_90 GPU (faked here) implementation=None takes the jnp
  reference for RoPE calls reading under SMALL_CALL_BYTES of 16-bit
  latents (measured faster there) and the Mosaic GPU kernel above and
  without RoPE (the kernel measured faster at any size); an explicit
  "mosaic_gpu" is kept."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "compute_capability", lambda: 9.0)
  # Llama-3-8B, M-LRD 50 %: 8 KV heads, R_k = R_v = 64
  spec = LatentSpec(groups=8, kv_per_group=1, q_per_kv=4, head_dim=128,
                    k_rank=64, v_rank=64)
  small = jnp.zeros((1, 32, 128), jnp.bfloat16)     # B1 4K: 8.4 MB
  assert 4096 * spec.latent_bytes_per_token() < api.SMALL_CALL_BYTES
  assert api.resolve(None, spec, small, 4096, True) == "xla"
  assert api.resolve("mosaic_gpu", spec, small, 4096, True) == "mosaic_gpu"
  big = jnp.zeros((8, 32, 128), jnp.bfloat16)       # B8 4K: 67 MB
  assert api.resolve(None, spec, big, 4096, True) == "mosaic_gpu"
  assert api.resolve(None, spec, small, 65536, False) == "mosaic_gpu"
  assert api.resolve(None, spec, small, 4096, False) == "mosaic_gpu"
  # 4-bit codes: the Mosaic GPU kernel on both paths; Triton with RoPE
  # when the config turns that off
  int4 = LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256, bits=4, quant_group=32)
  assert api.resolve(None, int4, big, 65536, False) == "mosaic_gpu"
  assert api.resolve(None, int4, big, 65536, True) == "mosaic_gpu"
  off = mg.MosaicConfig(int4_rope=False)
  assert api.resolve(None, int4, big, 65536, True, off) == "triton"


# ------------------------------------------------- CPU: lowering for sm_90

LOWER_CASES = [
    # (G, J, Q, H, R_k, R_v, shared, batch, S)
    (8, 4, 1, 128, 256, 256, False, 1, 4096),   # Llama-2-7B, G-LRD-4, 50 %
    (2, 4, 4, 128, 256, 256, False, 8, 4096),   # Llama-3-8B, G-LRD-4
    (32, 1, 1, 128, 64, 64, False, 2, 1024),    # M-LRD
    (3, 1, 3, 64, 32, 64, False, 2, 1024),      # SmolLM2-like, H = 64
    (2, 2, 2, 64, 128, 128, True, 2, 1024),     # shared latent
    # SmolLM2-135M's default (one shared latent for its 3 KV heads): the
    # chosen config was 152 bytes over the limit before smem_bytes counted
    # the reduction scratch (lowering reports the overflow on the CPU too)
    (1, 3, 3, 64, 192, 192, True, 16, 8320),
    # ranks that are not multiples of 64 (30 % on M-LRD, G-LRD-2, SmolLM2;
    # Fisher ranks in multiples of 16): p·h_v in overlapping 64-row pieces
    (8, 1, 1, 128, 96, 96, False, 2, 1024),
    (4, 2, 2, 128, 176, 176, False, 2, 1024),
    (1, 3, 3, 64, 272, 272, True, 16, 8192),
    (2, 1, 2, 64, 80, 80, False, 1, 512),
]


def _lower(spec, batch, s, rope, dtype=jnp.bfloat16, config=None):
  sd = jax.ShapeDtypeStruct

  def side(rank):     # float8: codes and one scale per token and group
    if spec.bits == 8:
      return QuantLatent(sd((batch, s, spec.groups * rank), jnp.float8_e4m3fn),
                         sd((batch, s, spec.groups), dtype),
                         sd((batch, s, 0), dtype))
    if spec.bits == 4:  # packed codes, a scale and offset per quant group
      width = spec.groups * rank
      per_group = sd((batch, s, width // spec.quant_group), dtype)
      return QuantLatent(sd((batch, s, width // 2), jnp.uint8), per_group,
                         per_group)
    return sd((batch, s, spec.groups * rank), dtype)
  args = (sd((batch, spec.n_heads, spec.head_dim), dtype), side(spec.k_rank),
          None if spec.shared else side(spec.v_rank),
          sd((spec.groups * spec.k_rank, spec.kv_per_group * spec.head_dim),
             dtype),
          sd((batch,), jnp.int32), sd((spec.head_dim // 2,), jnp.float32),
          sd((spec.groups * spec.kv_per_group * spec.head_dim,), dtype))

  def f(q, hk, hv, k_up, lengths, inv, kb):
    return mg.latent_attention(q, hk, hv, k_up, lengths, spec=spec,
                               inv_freq=inv if rope else None, k_bias=kb,
                               config=config)
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


# the kernel's three ways to score: RoPE keys rebuilt, RoPE with the query
# folded into B_k, no RoPE (B_k folded into the query)
PATHS = [(True, "rebuild"), (True, "fold"), (False, "rebuild")]
PATH_IDS = ["rebuild", "fold", "norope"]


@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("block_s", [None, 64, 128])
@pytest.mark.parametrize("rope,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", LOWER_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_kernel_lowers_for_sm90(case, rope, mode, block_s, wgs):
  """Every shape and path with the chosen config and with each tile size
  that fits its shared memory (one ring slot per compute WG), with two and
  three compute WGs."""
  g, j, qk, h, rk, rv, shared, batch, s = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  config = mg.choose_config(spec, batch=batch, cache_len=s, rope=rope,
                            compute_wgs=wgs)
  config = dataclasses.replace(config, rope_mode=mode, value_pieces=True, **(
      dict(block_s=block_s, stages=wgs, splits=2) if block_s else {}))
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  text = _lower(spec, batch, s, rope, config=config).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("rope,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", LOWER_CASES[:6],
                         ids=lambda c: "-".join(map(str, c)))
def test_kernel_with_turns_lowers_for_sm90(case, rope, mode, wgs):
  """`private_reductions=False`: the reductions through Pallas's one
  scratch, the compute WGs taking turns (the v12 kernel)."""
  g, j, qk, h, rk, rv, shared, batch, s = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  config = dataclasses.replace(
      mg.choose_config(spec, batch=batch, cache_len=s, rope=rope,
                       compute_wgs=wgs),
      rope_mode=mode, private_reductions=False)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  assert "mosaic_gpu" in _lower(spec, batch, s, rope, config=config).as_text()


# (G, J, Q, H, R_k, R_v, shared, batch, S): groups of several KV heads
SEVERAL_HEADS = [
    (1, 3, 3, 64, 192, 192, True, 16, 8192),    # SmolLM2-135M's default
    (4, 2, 2, 128, 128, 128, False, 2, 1024),   # G-LRD-2, GQA 2
    (2, 2, 1, 128, 64, 64, False, 1, 512),      # G-LRD-2, MHA, small ranks
    (2, 4, 1, 64, 64, 64, False, 1, 512),       # four heads of 64
]


@pytest.mark.parametrize("case", SEVERAL_HEADS,
                         ids=lambda c: "-".join(map(str, c)))
def test_kernel_lowers_with_several_kv_heads_per_cta(case):
  """`kv_heads_per_cta`: every divisor of the group's KV heads that fits
  shared memory lowers for sm_90, with its chosen tiles and with 64-row
  tiles; a non-divisor and the fold mode are refused by name."""
  g, j, qk, h, rk, rv, shared, batch, s = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  lowered = 0
  for hc in range(2, j + 1):
    config = mg.choose_config(spec, batch=batch, cache_len=s, rope=True,
                              kv_heads_per_cta=hc)
    if j % hc:
      assert "kv_heads_per_cta" in mg.unsupported_reason(
          spec, jnp.bfloat16, s, True, config)
      continue
    assert "rope_mode 'fold'" in mg.unsupported_reason(
        spec, jnp.bfloat16, s, True,
        dataclasses.replace(config, rope_mode="fold"))
    for cfg in (config, dataclasses.replace(config, block_s=64, stages=2)):
      if mg.unsupported_reason(spec, jnp.bfloat16, s, True, cfg):
        continue
      # one rebuild and one score wgmma for all heads (heads × H ≤ 256),
      # and one per head
      for fuse in (True, False):
        c = dataclasses.replace(cfg, fuse_heads=fuse)
        assert mg.fused_heads(spec, True, c) == (fuse and hc * h <= 256)
        assert "mosaic_gpu" in _lower(spec, batch, s, True,
                                      config=c).as_text()
        lowered += 1
  assert lowered                   # each case has a configuration that fits


def test_block_diagonal_queries_score_every_head_in_one_product():
  """Keys of 3 heads side by side times the block-diagonal queries'
  transpose = each head's keys times its own queries (numpy, per head)."""
  rng = np.random.default_rng(0)
  b, x, hc, nq, h, rows = 2, 2, 3, 8, 64, 16
  q = rng.standard_normal((b, x, hc, nq, h)).astype(np.float32)
  keys = rng.standard_normal((rows, hc * h)).astype(np.float32)
  bd = np.asarray(mg.block_diagonal_queries(jnp.asarray(q)))
  assert bd.shape == (b, x, hc * nq, hc * h)
  got = keys @ bd[1, 0].T                              # [rows, hc·nq]
  for a in range(hc):
    np.testing.assert_allclose(got[:, a * nq:(a + 1) * nq],
                               keys[:, a * h:(a + 1) * h] @ q[1, 0, a].T,
                               rtol=1e-5, atol=1e-5)
  # off the blocks: exact zeros (a head never sees another head's keys)
  assert np.count_nonzero(bd) == np.count_nonzero(q)


# (G, J, Q, H, R, shared, batch, S): float8 caches, one scale per token
FP8_CASES = [
    (8, 1, 1, 128, 64, False, 2, 1024),      # M-LRD
    (2, 4, 1, 128, 256, False, 1, 4096),     # G-LRD-4
    (1, 3, 3, 64, 192, True, 16, 8192),      # SmolLM2's shared latent
    (2, 2, 2, 128, 128, False, 2, 512),      # GQA 2
    # Llama-3-8B G-LRD-4: 16 query heads per latent group; with fp8_scores
    # its query parts [2, 16, R] were one TMA of 6 strided dims (refused)
    (2, 4, 4, 128, 256, False, 1, 4096),
]


def _fp8_spec(g, j, qk, h, r, shared):
  """float8 latents, one scale per token and group, and an e4m3 B_k (the
  rebuild's operand; `check` rounds k_up to it)."""
  return LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=r, v_rank=r, shared=shared, bits=8, quant_group=r,
                    k_up_bits=8)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("block_s", [None, 64, 128])
@pytest.mark.parametrize("case", FP8_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_fp8_kernel_lowers_for_sm90(case, block_s, rope):
  """The float8 path: keys rebuilt by an fp8 wgmma (RoPE) or codes upcast
  to f16 in registers (no RoPE), a scale per token on the keys or scores
  and on P; every shape with its chosen tiles and each tile size that
  fits."""
  g, j, qk, h, r, shared, batch, s = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), fp8_latents=True, **(
          dict(block_s=block_s, stages=2) if block_s else {}))
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  assert "mosaic_gpu" in _lower(spec, batch, s, rope, config=config).as_text()


@pytest.mark.parametrize("promote", [True, False], ids=["promote", "one"])
@pytest.mark.parametrize("block_s", [None, 64, 128])
@pytest.mark.parametrize("case", [c for c in FP8_CASES if not c[5]],
                         ids=lambda c: "-".join(map(str, c)))
def test_fp8_scores_lower_for_sm90(case, block_s, promote):
  """Scores straight from the e4m3 key codes (`fp8_scores`, no RoPE): fp8
  wgmmas against the query's e4m3 parts, into one accumulator per part and
  latent chunk (promote) or one for all."""
  g, j, qk, h, r, shared, batch, s = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=False), fp8_scores=True,
      fp8_promote=promote, **(
          dict(block_s=block_s, stages=2) if block_s else {}))
  assert mg.fp8_scores(spec, False, config)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, False, config):
    pytest.skip("does not fit")
  text = _lower(spec, batch, s, False, config=config).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", FP8_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_fp8_values_masked_in_every_tile_lowers_for_sm90(case, rope):
  """fp8_mask_last=False (the form before v31): float8 values selected to 0
  past the length in every tile's upcast, instead of the default's value
  tile cleared in the last tile and P's rows past the length selected to
  0; lowers for sm_90 on both paths (the shared latent's keys double as
  its values). The default form lowers in every other float8 test."""
  g, j, qk, h, r, shared, batch, s = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), fp8_mask_last=False)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  assert "mosaic_gpu" in _lower(spec, batch, s, rope,
                                config=config).as_text()


def test_e4m3_hi_lo_keeps_bf16_precision():
  """hi + lo (two e4m3 roundings) against x: within bf16's half ulp
  (2^-8 relative) wherever lo stays a normal e4m3 number, and within its
  subnormal step (2^-10 of the scale unit) elsewhere; one e4m3 rounding
  alone is 16x worse. Independent check: numpy float64 arithmetic."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 256)).astype(np.float32)
  x[0, 0] *= 1e-3                               # rows of any magnitude
  x[1, 1] = 0.0                                 # a zero row (padding)
  codes, scale = mg.e4m3_hi_lo(jnp.asarray(x))
  assert codes.shape == (3, 5, 2, 256) and codes.dtype == jnp.float8_e4m3fn
  assert scale.shape == (3, 5) and float(scale[1, 1]) == 1.0
  parts = np.asarray(codes.astype(jnp.float32), np.float64)
  got = (parts[..., 0, :] + parts[..., 1, :]) * np.asarray(scale)[..., None]
  err = np.abs(got - x)
  unit = np.asarray(scale, np.float64)[..., None]
  assert np.all(err <= np.maximum(2.0 ** -8 * np.abs(x), 2.0 ** -10 * unit))
  assert not np.any(got[1, 1])
  hi_only = parts[..., 0, :] * np.asarray(scale)[..., None]
  assert np.max(np.abs(hi_only - x)) > 8 * np.max(err)


# (G, J, Q, H, R, shared, batch, S): 4-bit codes, quant groups of 32
INT4_CASES = [
    (8, 4, 1, 128, 256, False, 2, 4096),     # Llama-2-7B G-LRD-4, 50 %
    (2, 4, 4, 128, 256, False, 1, 4096),     # Llama-3-8B G-LRD-4
    (2, 2, 2, 64, 256, True, 2, 512),        # shared latent
]


def _int4_spec(g, j, qk, h, r, shared, quant_group=32):
  """quant_group None: one scale and offset per token and latent group."""
  return LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=r, v_rank=r, shared=shared, bits=4,
                    quant_group=quant_group or r)


# the int4 defaults (the fused routine), and each of their alternatives:
# Mosaic GPU's conversion then separate scale and offset passes (with the
# XOR of the top bits, or a select per element pair for the sign), the
# value mask in every tile, a relayout instead of the permuted read
INT4_VARIANTS = {"default": {}, "steps": dict(int4_fused=False),
                 "steps_no_flip": dict(int4_fused=False, int4_flip=False),
                 "mask_every_tile": dict(int4_mask_last=False),
                 "relayout": dict(int4_permuted=False),
                 "keys_in_registers": dict(int4_keys_smem=False),
                 "values_during_scores": dict(values_during_scores=True),
                 "converter": dict(int4_converter=True),
                 "two_converters": dict(int4_converter=True,
                                        int4_converters=2)}


def test_int4_column_order_matches_the_two_register_layouts():
  """A thread of the WGMMA_UPCAST_4X layout holds, per register k, the 8
  columns 32k + 8q..8q+7 (q = lane % 4); read as the wgmma layout, pair j
  of that register is column tile 4k + j, i.e. the columns
  8(4k + j) + 2q + e. int4_column_order must map each of those to the
  column the register really holds, keep each block of 32 (a quant group
  of 32) to itself, and undo itself."""
  rank = 256
  order = mg.int4_column_order(rank)
  for q in range(4):
    for k in range(rank // 32):
      for v in range(8):
        j, e = divmod(v, 2)
        assert order[8 * (4 * k + j) + 2 * q + e] == 32 * k + 8 * q + v
  np.testing.assert_array_equal(order[order], np.arange(rank))
  np.testing.assert_array_equal(order // 32, np.arange(rank) // 32)


def test_int4_fused_column_order_matches_the_routine():
  """`_dequant_int4_fused` turns a thread's register k of the
  WGMMA_UPCAST_4X layout (columns 32k + 8q..8q+7, code v in bits 4v..4v+3)
  into pairs j = (codes j, j + 4), and pair j is the wgmma layout's
  columns 8(4k + j) + 2q + e. The order must name those columns, keep
  each block of 32 (a quant group of 32) whole, and be a permutation."""
  rank = 256
  order = mg.int4_fused_column_order(rank)
  for q in range(4):
    for k in range(rank // 32):
      for j in range(4):
        for e in range(2):
          assert order[8 * (4 * k + j) + 2 * q + e] == 32 * k + 8 * q + j + 4 * e
  np.testing.assert_array_equal(np.sort(order), np.arange(rank))
  np.testing.assert_array_equal(order // 32, np.arange(rank) // 32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_int4_fused_bit_trick_gives_the_codes(dtype):
  """The routine's PTX per pair, emulated in numpy (an independent
  reading of the same constants): (word >> 4j) & 0x000F000F | magic, read
  as two 16-bit floats, minus magic, gives codes j and j + 4 of the word
  exactly, for every code value; then ·scale + offset is one rounding of
  the exact affine map (what the reference computes in f32)."""
  magic = 0x64006400 if dtype == jnp.float16 else 0x43004300
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, size=(4096, 8))
  codes[:16] = np.arange(16)[:, None]              # every value in every slot
  word = (codes << (4 * np.arange(8))).sum(axis=1).astype(np.uint32)
  as_pair = lambda w: np.asarray(
      w.astype(np.uint32).view(np.uint16).reshape(-1, 2)).view(
          jnp.dtype(dtype)).astype(np.float32)
  scale = rng.uniform(0.01, 0.2, size=4096).astype(jnp.dtype(dtype))
  offset = rng.uniform(-1, 1, size=4096).astype(jnp.dtype(dtype))
  for j in range(4):
    t = as_pair(((word >> (4 * j)) & 0x000F000F) | magic) - as_pair(
        np.full_like(word, magic))
    np.testing.assert_array_equal(t, codes[:, [j, j + 4]])
    exact = t * scale.astype(np.float32)[:, None] + offset.astype(
        np.float32)[:, None]
    got = exact.astype(jnp.dtype(dtype)).astype(np.float32)
    ref = (codes[:, [j, j + 4]] * scale.astype(np.float32)[:, None]
           + offset.astype(np.float32)[:, None]).astype(jnp.dtype(dtype))
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("variant", INT4_VARIANTS)
@pytest.mark.parametrize("block_s", [None, 64, 128])
@pytest.mark.parametrize("case", INT4_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_int4_kernel_lowers_for_sm90(case, block_s, variant, rope):
  """4-bit codes: the rings read as int4 codes, converted to 16 bits in
  registers with a scale and offset per quant group, then scored against
  the absorbed query (no RoPE) or multiplied by B_k from registers and
  rotated (RoPE); every shape with its chosen tiles and each tile size
  that fits."""
  g, j, qk, h, r, shared, batch, s = case
  spec = _int4_spec(g, j, qk, h, r, shared)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), **INT4_VARIANTS[variant])
  if block_s:
    config = dataclasses.replace(config, block_s=block_s, stages=2)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  assert "mosaic_gpu" in _lower(spec, batch, s, rope,
                                config=config).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_int4_raw_key_scores_keep_f32_precision(dtype):
  """`int4_raw_keys`: the wgmma sums q·(M + c) in f32 (products of two
  16-bit floats are exact), then scale·that + (offset - M·scale)·Σq. The
  M·Σq part cancels; against the exact score q·(scale·c + offset) in
  float64 (Llama-sized rank, cache-like scales) its error must stay well
  under that of the dequantizing path, which rounds each key to the
  16-bit dtype before the same f32 sum (measured: bf16 650x, f16 8x
  smaller)."""
  m = mg.INT4_MAGIC[jnp.dtype(dtype)]
  rng = np.random.default_rng(1)
  rank, rows = 256, 2048
  q = rng.normal(size=(rank,)).astype(jnp.dtype(dtype)).astype(np.float64)
  codes = rng.integers(0, 16, size=(rows, rank)).astype(np.float64)
  scale = rng.uniform(0.005, 0.2, size=rows).astype(np.float32)
  offset = (-8 * scale * rng.uniform(0.5, 1.5, size=rows)).astype(np.float32)
  keys = codes * scale[:, None] + offset[:, None]
  exact = keys @ q
  f32_sum = lambda x: x.astype(np.float32).sum(axis=1, dtype=np.float32)
  rounded = keys.astype(np.float32).astype(jnp.dtype(dtype)).astype(
      np.float64)
  dequantized = f32_sum(rounded * q)
  raw = f32_sum((codes + m) * q)
  q_sum = q.astype(np.float32).sum(dtype=np.float32)
  got = raw * scale + (offset - np.float32(m) * scale) * q_sum
  rms = lambda e: np.sqrt(np.mean(e ** 2))
  assert rms(got - exact) * 4 < rms(dequantized - exact)
  assert np.abs(got - exact).max() * 4 < np.abs(dequantized - exact).max()


@pytest.mark.parametrize("block_s", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_int4_raw_values_lower_for_sm90(dtype, block_s):
  """int4_raw_values in both 16-bit types (bf16 and f16 magic constants)
  and both tile sizes lowers to a Mosaic GPU kernel for sm_90."""
  spec = _int4_spec(8, 4, 1, 128, 256, False, quant_group=None)
  config = dataclasses.replace(
      mg.choose_config(spec, batch=2, cache_len=4096, rope=False),
      block_s=block_s, stages=2)
  assert mg.raw_int4_values(spec, False, config)
  assert mg.unsupported_reason(spec, dtype, 4096, False, config) is None
  assert "mosaic_gpu" in _lower(spec, 2, 4096, False, dtype=dtype,
                                config=config).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_int4_raw_values_beat_the_dequantizing_path(dtype):
  """`int4_raw_values` (v27): P·V as (p·scale rounded to 16 bits)·(c - 8)
  on the tensor core (f32 sums; c - 8 exact) plus Σ p·(offset + 8·scale)
  in f32, against the exact float64 p·(c·scale + offset). Its error must
  stay below the dequantizing path's (p and c·scale + offset each rounded
  to 16 bits), for cache-like scales and softmax-like p; the uncentered
  M + c form, whose M·Σ(p·scale) cancels in f32, must not (it measured
  1.6× (bf16) and 7× (f16) the dequantizing path's error: why the codes
  are centered)."""
  m = mg.INT4_MAGIC[jnp.dtype(dtype)]
  rng = np.random.default_rng(2)
  rows, rank, cols = 2048, 256, 8
  p = (rng.uniform(0, 1, size=(rows, cols)) ** 4).astype(np.float32)
  codes = rng.integers(0, 16, size=(rows, rank)).astype(np.float64)
  scale = rng.uniform(0.005, 0.2, size=rows).astype(np.float32)
  offset = (-8 * scale * rng.uniform(0.5, 1.5, size=rows)).astype(np.float32)
  exact = p.astype(np.float64).T @ (codes * scale[:, None] + offset[:, None])
  r16 = lambda x: np.asarray(x, np.float32).astype(jnp.dtype(dtype)).astype(
      np.float32)
  dot = lambda a, b: a.astype(np.float32).T @ b.astype(np.float32)
  col_sum = lambda x: x.sum(axis=0, dtype=np.float32)[:, None]
  dequantized = dot(r16(p), r16(codes * scale[:, None] + offset[:, None]))
  ps = r16(p * scale[:, None])
  centered = dot(ps, codes - 8) + col_sum(p * (offset + 8 * scale)[:, None])
  uncentered = (dot(ps, codes + m) + col_sum(p * offset[:, None])
                - np.float32(m) * col_sum(ps))
  rms = lambda e: np.sqrt(np.mean((e - exact) ** 2))
  assert rms(centered) < 0.85 * rms(dequantized)
  assert rms(uncentered) > 1.3 * rms(dequantized)


# one scale per token: the defaults (without RoPE the keys' magic values
# scored and corrected per row), the keys dequantized as with groups, and
# the separate steps
TOKEN_VARIANTS = {"default": {}, "dequantized_keys": dict(int4_raw_keys=False),
                  "steps": dict(int4_fused=False),
                  "converter": dict(int4_converter=True),
                  "two_converters": dict(int4_converter=True,
                                         int4_converters=2),
                  "dequantized_values": dict(int4_raw_values=False),
                  "scores_together": dict(int4_scores_together=True)}


@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
@pytest.mark.parametrize("case", INT4_CASES + [
    (8, 1, 1, 128, 64, False, 2, 4096),      # M-LRD: 64 latents a head
], ids=lambda c: "-".join(map(str, c)))
def test_int4_token_scales_lower_for_sm90(case, variant, rope):
  """One scale and offset per token and latent group: token-major scale
  rings (one TMA row per tile and side, as float8's) and per-row loads,
  with the fused routine and with the separate steps."""
  g, j, qk, h, r, shared, batch, s = case
  spec = _int4_spec(g, j, qk, h, r, shared, quant_group=None)
  assert mg.int4_token_scales(spec)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), **TOKEN_VARIANTS[variant])
  converters = variant in ("converter", "two_converters")
  if converters:   # their value ring fits beside 64-row tiles only
    config = dataclasses.replace(config, block_s=mg.SUB, stages=4)
  raw_keys = variant in ("default", "dequantized_values", "scores_together")
  assert mg.raw_int4_keys(spec, rope, config) == (
      (raw_keys or converters) and not rope and not shared)
  assert mg.raw_int4_values(spec, rope, config) == (
      variant in ("default", "scores_together") and not rope and not shared)
  assert mg.int4_scores_together(spec, rope, config) == (
      variant == "scores_together" and not rope and not shared
      and config.block_s > mg.SUB)
  assert mg.int4_converter(spec, rope, config) == (
      converters and not rope and not shared)
  assert mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config) is None
  assert mg.smem_bytes(spec, rope, config) <= mg.SMEM_BYTES
  assert "mosaic_gpu" in _lower(spec, batch, s, rope,
                                config=config).as_text()


@pytest.mark.parametrize("compute_wgs,converters", [(2, 0), (3, 0), (2, 1),
                                                     (2, 2)])
def test_registers_fit_the_launch_pool(compute_wgs, converters):
  """setmaxnreg only moves registers within what the CTA launched with: the
  registers every WG sets (producer, compute WGs, converters) must fit
  launch_registers · WGs, or an increase waits forever (v26's first
  compiled run hung on 24 + 2·136 + 2·104 = 504 > 5 · 96). Each count is
  a multiple of 8 (setmaxnreg) within [24, 256]."""
  wgs = compute_wgs + 1 + converters
  # 65536 registers / (threads) floored to the allocation unit of 8
  launch = {3: 168, 4: 128, 5: 96}[wgs]
  assert mg.launch_registers(wgs) == launch
  compute = mg._compute_registers(compute_wgs, converters)
  if converters:
    producer, table_compute, converter = mg._CONVERTER_REGISTERS[converters]
    assert table_compute == compute
  else:
    producer, converter = mg._PRODUCER_REGISTERS[compute_wgs], 0
  counts = (producer, compute) + ((converter,) if converters else ())
  assert producer + compute_wgs * compute + converters * converter <= (
      launch * wgs)
  assert all(n % 8 == 0 and 24 <= n <= 256 for n in counts)


def test_int4_reasons():
  spec = _int4_spec(8, 4, 1, 128, 256, False)
  on = mg.MosaicConfig()        # on by default
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, False, on) is None
  assert "int4_latents=False" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, False, mg.MosaicConfig(int4_latents=False))
  # with RoPE: the keys rebuilt from registers (rebuild mode only)
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, True, on) is None
  assert "fold" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, True, mg.MosaicConfig(rope_mode="fold"))
  assert "int4_rope=False" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, True, mg.MosaicConfig(int4_rope=False))
  # a tile's scales are a TMA row of R / quant_group 16-bit values: ≥ 16 B
  small = dataclasses.replace(spec, k_rank=128, v_rank=128)
  assert "multiple of 8" in mg.unsupported_reason(small, jnp.bfloat16, 1024,
                                                  False, on)
  # ... unless there is one scale per token: a [tile] row, token-major
  token = dataclasses.replace(small, quant_group=128)
  assert mg.int4_token_scales(token)
  assert mg.unsupported_reason(token, jnp.bfloat16, 1024, False, on) is None
  assert not mg.int4_token_scales(dataclasses.replace(
      spec, k_rank=128, v_rank=256, quant_group=128))
  assert "quant_group 24" in mg.unsupported_reason(
      dataclasses.replace(spec, quant_group=24), jnp.bfloat16, 1024, False,
      on)
  assert "multiples of 64" in mg.unsupported_reason(
      dataclasses.replace(spec, k_rank=288, v_rank=288, quant_group=16),
      jnp.bfloat16, 1024, False, on)
  assert "int4_converters 3 (1 or 2)" == mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, False,
      mg.MosaicConfig(int4_converter=True, int4_converters=3))
  # the chosen tiles fit the estimate (lowering checks the real allocation)
  for case in INT4_CASES:
    g, j, qk, h, r, shared, batch, s = case
    sp = _int4_spec(g, j, qk, h, r, shared)
    for rope in (False, True):
      c = mg.choose_config(sp, batch=batch, cache_len=s, rope=rope)
      assert mg.smem_bytes(sp, rope, c) <= mg.SMEM_BYTES


def test_fp8_reasons():
  spec = _fp8_spec(8, 1, 1, 128, 64, False)
  off = mg.MosaicConfig(fp8_latents=False)
  assert "fp8_latents=False" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, False, off)
  on = mg.MosaicConfig()        # on by default
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, False, on) is None
  # with RoPE: keys rebuilt by an fp8 wgmma (e4m3 B_k); not in fold mode
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, True, on) is None
  assert "rope_mode 'fold'" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, True, dataclasses.replace(
          on, rope_mode="fold"))
  assert "quant_group 32" in mg.unsupported_reason(
      dataclasses.replace(spec, quant_group=32), jnp.bfloat16, 1024, False,
      on)
  # a model that keeps B_k in 16 bits: the fp8 rebuild would round it to
  # e4m3 behind the model's back, so RoPE calls go elsewhere; without RoPE
  # B_k is folded into the query in f32 and the kernel takes it
  bf16_b = dataclasses.replace(spec, k_up_bits=16)
  assert "--k-up-bits 8" in mg.unsupported_reason(
      bf16_b, jnp.bfloat16, 1024, True, on)
  assert mg.unsupported_reason(bf16_b, jnp.bfloat16, 1024, False, on) is None


# ------------------------------------------ GPU: compiled kernel vs reference

# merge_in_kernel: (spec, batch, S) with 16-bit, float8 and int4 latents
MERGE_CASES = [
    (LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                k_rank=256, v_rank=256), 1, 4096),
    (LatentSpec(groups=2, kv_per_group=4, q_per_kv=4, head_dim=128,
                k_rank=256, v_rank=256), 1, 4096),
    (LatentSpec(groups=32, kv_per_group=1, q_per_kv=1, head_dim=128,
                k_rank=64, v_rank=64), 2, 1024),
    (LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=64,
                k_rank=128, v_rank=128, shared=True), 2, 1024),
    (_fp8_spec(2, 4, 1, 128, 256, False), 1, 4096),
    (_int4_spec(8, 4, 1, 128, 256, False), 2, 4096),
]


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", MERGE_CASES,
                         ids=lambda c: f"{c[0].groups}-{c[0].kv_per_group}-"
                         f"{c[0].q_per_kv}-{c[0].k_rank}-{c[0].bits}")
def test_merge_in_kernel_lowers_for_sm90(case, rope):
  """merge_in_kernel (v24): the program's last WG waits on a semaphore for
  the other WGs' signals and merges the partials from global memory. The
  kernel lowers for sm_90 on the 16-bit, float8 and int4 paths, with the
  signal (a release add) and the wait (a polling load) in it; the
  merged rows are one more slot of the accumulator output."""
  spec, batch, s = case
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), merge_in_kernel=True)
  parts = mg.stored_parts(config, config.splits)
  if parts > mg.MERGE_IN_KERNEL_PARTS:
    config = dataclasses.replace(
        config, splits=config.splits * mg.MERGE_IN_KERNEL_PARTS // parts)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, config):
    pytest.skip("does not fit")
  text = _lower(spec, batch, s, rope, config=config).as_text()
  assert "red.release.gpu.global.add" in text
  assert "ld.relaxed.gpu.global.b32" in text


# (G, J, Q, H, R, shared, bits): RoPE paths v30 takes (16-bit and float8)
EARLY_CASES = [
    (2, 4, 1, 128, 256, False, 16),     # G-LRD-4, MHA
    (8, 1, 1, 128, 64, False, 16),      # M-LRD (128-row tiles)
    (4, 2, 2, 128, 128, False, 16),     # G-LRD-2, both heads a CTA
    (1, 3, 3, 64, 192, True, 16),       # SmolLM2's shared latent
    (2, 4, 4, 128, 256, False, 8),      # float8 G-LRD-4, GQA 4
    (8, 1, 1, 128, 64, False, 8),       # float8 M-LRD
]


def _early_spec(g, j, qk, h, r, shared, bits):
  return (_fp8_spec(g, j, qk, h, r, shared) if bits == 8 else
          LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                     k_rank=r, v_rank=r, shared=shared))


@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("case", EARLY_CASES,
                         ids=lambda c: "-".join(map(str, c)))
def test_rebuild_early_lowers_for_sm90(case, wgs):
  """rebuild_early (v30): the tile loop with the first rebuild wgmma in
  flight across the previous tile's tail lowers for sm_90 with the chosen
  config and with one ring slot per WG; a shared latent with one slot per
  WG is refused by name (its slot holds the previous tile's values while
  the next tile's keys are awaited); int4 and fused heads keep the plain
  loop."""
  spec = _early_spec(*case)
  s = 4096
  chosen = dataclasses.replace(mg.choose_config(
      spec, batch=2, cache_len=s, rope=True, compute_wgs=wgs),
      rebuild_early=True)
  assert mg.rebuild_early(spec, True, chosen)
  assert not mg.rebuild_early(spec, False, chosen)
  assert not mg.rebuild_early(
      spec, True, dataclasses.replace(chosen, rope_mode="fold"))
  int4 = LatentSpec(groups=2, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256, bits=4, quant_group=32)
  assert not mg.rebuild_early(int4, True, chosen)
  lowered = 0
  for cfg in (chosen, dataclasses.replace(chosen, block_s=64, stages=wgs,
                                          splits=3)):
    reason = mg.unsupported_reason(spec, jnp.bfloat16, s, True, cfg)
    if spec.shared and cfg.stages < 2 * wgs:
      assert "rebuild_early with a shared latent" in reason
      continue
    if reason:
      continue
    assert "mosaic_gpu" in _lower(spec, 2, s, True, config=cfg).as_text()
    lowered += 1
  if not lowered:      # (G-LRD-4 with three compute WGs: never fits)
    pytest.skip("does not fit")


@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("merge_wgs", [True, False])
def test_kernel_stores_one_partial_per_split_when_wgs_merge(merge_wgs, wgs):
  """merge_wgs (v29): the compute WGs of a CTA merge their partials in the
  kernel, so its outputs hold one partial per split ([B, X, P, R_v, cols]
  and [B, X, P, cols]); without it one per split and compute WG. Read
  from the result types of the lowered kernel call."""
  spec, batch, s = MERGE_CASES[0]
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=False, compute_wgs=wgs),
      merge_wgs=merge_wgs)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, False, config):
    pytest.skip("does not fit")
  text = _lower(spec, batch, s, False, config=config).as_text()
  call = next(line for line in text.splitlines()
              if "custom_call" in line and "mosaic" in line)
  parts = config.splits * (1 if merge_wgs else wgs)
  assert mg.stored_parts(config, config.splits) == parts
  x = spec.groups
  cols = mg.query_cols(spec, False)
  assert (f"-> (tensor<{batch}x{x}x{parts}x{spec.v_rank}x{cols}xf32>, "
          f"tensor<{batch}x{x}x{parts}x{cols}xf32>") in call


@pytest.mark.parametrize("batch,s", [(1, 65536), (8, 65536), (1, 4096)])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
def test_choose_config_merges_wgs_up_to_eight_splits(batch, s, rope):
  """choose_config turns merge_wgs on exactly where it picks at most
  MERGE_WGS_SPLITS splits (measured: it pays on long splits only)."""
  spec = LatentSpec(groups=2, kv_per_group=4, q_per_kv=4, head_dim=128,
                    k_rank=256, v_rank=256)      # Llama-3-8B, G-LRD-4
  config = mg.choose_config(spec, batch=batch, cache_len=s, rope=rope)
  assert config.merge_wgs == (config.splits <= 8)


def test_merge_in_kernel_refuses_too_many_partials():
  spec, batch, s = MERGE_CASES[0]
  # 4096 rows in tiles of 64: 32 splits of 2 tiles, two WGs each, their
  # partials stored apart (merge_wgs off)
  config = mg.MosaicConfig(block_s=64, stages=2, splits=32,
                           merge_in_kernel=True, merge_wgs=False)
  why = mg.unsupported_reason(spec, jnp.bfloat16, s, False, config)
  assert why == ("merge_in_kernel with 64 split partials (at most 32: one "
                 "warpgroup reads them all)")
  with pytest.raises(ValueError, match="merge_in_kernel with 64 split"):
    _lower(spec, batch, s, False, config=config)


def test_int8_key_column_order_matches_the_two_register_layouts():
  """`_int4_codes_as_int8` turns a thread's register k of the
  WGMMA_UPCAST_4X layout (columns 32k + 8q..8q+7, code v in bits
  4v..4v+3) into its even codes (v = 2i, byte i) as register 2k and its
  odd codes (v = 2i + 1) as register 2k + 1 of the wgmma 8-bit layout,
  whose register b holds columns 16b + 4q + i. The order must name, for
  each of those columns, the code it holds, keep each block of 32 whole,
  and be a permutation."""
  rank = 256
  order = mg.int8_key_column_order(rank)
  for q in range(4):
    for k in range(rank // 32):
      for i in range(4):
        for e in range(2):          # even codes in 2k, odd ones in 2k + 1
          assert order[16 * (2 * k + e) + 4 * q + i] == (
              32 * k + 8 * q + 2 * i + e)
  np.testing.assert_array_equal(np.sort(order), np.arange(rank))
  np.testing.assert_array_equal(order // 32, np.arange(rank) // 32)


def test_int8_rebuild_weight_rounds_each_column_once():
  """B_k's int8 rounding for the int4 RoPE rebuild: per KV head and
  column a power of two s ≥ max |column| / 127 (and < twice that), codes
  within ±127, each weight within s/2 of B_k, the result exact in bf16
  and unchanged when rounded again. Independent check: numpy."""
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=1, head_dim=64,
                    k_rank=96, v_rank=96, bits=4, quant_group=96)
  rng = np.random.default_rng(3)
  w = rng.standard_normal((2 * 96, 2 * 64)).astype(np.float32)
  w[:96, 5] = 0.0                                   # a zero column
  w[96:, 70] *= 1e-3                                # a small one
  codes, scale = mg.int8_columns(jnp.asarray(w), spec)
  codes, scale = np.asarray(codes), np.asarray(scale)
  assert codes.dtype == np.int8 and codes.shape == (4, 64, 96)
  assert np.all(np.abs(codes.astype(np.int32)) <= 127)
  # per (group, head) block of columns: its max over the group's rows
  blocks = w.reshape(2, 96, 2, 64).transpose(0, 2, 1, 3).reshape(4, 96, 64)
  amax = np.abs(blocks).max(axis=1)
  np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
  live = amax > 0
  assert np.all(scale[live] >= amax[live] / 127)
  assert np.all(scale[live] < 2 * amax[live] / 127)
  assert np.all(scale[~live] == 1.0)
  rounded = np.asarray(mg.int8_rebuild_weight(jnp.asarray(w), spec))
  # weight (96g + r, 64j + n) has its head's column scale [2g + j, n]
  per_weight = np.broadcast_to(scale.reshape(2, 1, 2, 64),
                               (2, 96, 2, 64)).reshape(192, 128)
  assert np.all(np.abs(rounded - w) <= per_weight / 2)
  as_bf16 = np.asarray(jnp.asarray(rounded, jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(as_bf16, rounded)
  again = np.asarray(mg.int8_rebuild_weight(jnp.asarray(as_bf16), spec))
  np.testing.assert_array_equal(again, rounded)


@pytest.mark.parametrize("case", [(2, 4, 1, 128, 256, 2, 1024),
                                  (2, 4, 4, 128, 256, 1, 1024),
                                  (8, 1, 1, 128, 64, 2, 512)],
                         ids=lambda c: "-".join(map(str, c)))
def test_int4_int8_rebuild_lowers_for_sm90(case):
  """int4_int8_rebuild (int4 RoPE keys, one scale per token: codes as int8
  bytes into an int8 wgmma with an int8 B_k) lowers for sm_90; with quant
  groups of 32 (scales per group) it does not apply."""
  g, j, qk, h, r, batch, s = case
  spec = _int4_spec(g, j, qk, h, r, False, None)
  config = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=True), int4_int8_rebuild=True)
  assert mg.int8_rebuild(spec, True, config)
  assert not mg.int8_rebuild(spec, False, config)
  assert not mg.int8_rebuild(_int4_spec(g, j, qk, h, r, False), True, config)
  assert mg.unsupported_reason(spec, jnp.bfloat16, s, True, config) is None
  assert "mosaic_gpu" in _lower(spec, batch, s, True,
                                config=config).as_text()


def e4m3_rebuild_weight(k_up, spec, dtype):
  """B_k as the float8 rebuild multiplies it (e4m3 with power-of-two column
  scales, as `--k-up-bits 8` stores it), for the kernel and the reference
  alike."""
  return jnp.asarray(fp8_quant.round_weight_columns(
      k_up, [spec.k_rank] * spec.groups), dtype)


def check(spec, *, batch, cache_len, lengths, dtype, rope, bias=False,
          config=None, mode=None, seed=0):
  """Compiled kernel vs the reference; `mode` sets the RoPE scoring of the
  chosen (or given) config. Skips a mode the shape's shared memory cannot
  take (returns False)."""
  if mode is not None:
    config = dataclasses.replace(config or mg.choose_config(
        spec, batch=batch, cache_len=cache_len, rope=rope), rope_mode=mode)
    if mg.unsupported_reason(spec, dtype, cache_len, rope, config):
      return False
  q, hk, hv, k_up, k_bias, inv = make_inputs(spec, batch, cache_len, dtype,
                                             seed)
  if spec.bits == 8 and rope:
    k_up = e4m3_rebuild_weight(k_up, spec, dtype)
  if config is not None and mg.int8_rebuild(spec, rope, config):
    # B_k as the int8 rebuild multiplies it (exact in bf16), both sides
    k_up = mg.int8_rebuild_weight(k_up, spec).astype(dtype)
  kw = dict(spec=spec, inv_freq=inv if rope else None,
            k_bias=k_bias if bias else None)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = mg.latent_attention(q, hk, hv, k_up, lengths, config=config, **kw)
  with jax.default_matmul_precision("highest"):
    want = reference_for(rope)(q, hk, hv, k_up, lengths, **kw)
  assert out.shape == (batch, spec.n_heads, spec.v_rank)
  assert out.dtype == jnp.float32
  out, want = np.asarray(out), np.asarray(want)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want, atol=TOL[dtype] * np.max(np.abs(
      want)), rtol=0)
  return True


# (G, J, Q, H, R, shared, batch, S, lengths): float8 caches on the GPU
FP8_GPU_CASES = [
    (8, 1, 1, 128, 64, False, 2, 1024, [1000, 64]),     # M-LRD
    (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),      # G-LRD-4
    (1, 3, 3, 64, 192, True, 2, 320, [320, 1]),         # SmolLM2 shared
    (2, 2, 2, 128, 128, False, 3, 448, [448, 1, 200]),  # GQA 2
    (2, 4, 4, 128, 256, False, 2, 256, [256, 90]),      # GQA 4, G-LRD-4
]

GPU_GRID = [
    # (G, J, Q, H, R_k, R_v, shared, batch, S, lengths)
    (1, 1, 1, 64, 64, 64, False, 1, 64, [1]),
    (2, 4, 1, 128, 256, 256, False, 2, 512, [512, 77]),   # G-LRD-4, MHA
    (2, 4, 4, 128, 256, 256, False, 3, 448, [448, 1, 200]),  # GQA 4
    (4, 2, 2, 128, 128, 128, False, 2, 256, [130, 256]),   # G-LRD-2
    (8, 1, 1, 128, 64, 64, False, 2, 1024, [1000, 64]),    # M-LRD
    (3, 1, 3, 64, 32, 64, False, 2, 320, [319, 65]),       # SmolLM2-like
    (2, 2, 2, 64, 128, 128, True, 2, 256, [256, 3]),       # shared latent
    (1, 3, 5, 128, 192, 128, False, 1, 128, [100]),        # J=3, Q=5
]


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rope,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", GPU_GRID,
                         ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_kernel_matches_reference(case, rope, mode, dtype):
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  if not check(spec, batch=batch, cache_len=s, lengths=lengths, dtype=dtype,
               rope=rope, bias=rope, mode=mode):
    pytest.skip("does not fit shared memory")


@gpu
@needs_hopper
@pytest.mark.parametrize("rope,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", GPU_GRID,
                         ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_turns_on_one_reduction_scratch(case, rope, mode):
  """`private_reductions=False` (v12 and before): both reductions per tile
  through Pallas's one scratch, the compute WGs taking turns."""
  check_grid_case(case, rope, mode, private_reductions=False)


def check_grid_case(case, rope, mode, **changes):
  """One bf16 case of a (G, J, Q, H, R_k, R_v, shared, batch, S, lengths)
  grid with the chosen config and `changes` to it; skips a case the
  shared memory cannot take."""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), **changes)
  if not check(spec, batch=batch, cache_len=s, lengths=lengths,
               dtype=jnp.bfloat16, rope=rope, bias=rope, config=cfg,
               mode=mode):
    pytest.skip("does not fit shared memory")


@gpu
@needs_hopper
@pytest.mark.parametrize("block_s,stages,splits,rotation", [
    (64, 2, 1, "float16"), (64, 4, 3, "float16"), (64, 2, 5, "float32"),
    (64, 4, 1, "float32"), (128, 2, 3, "float16"), (128, 2, 1, "float32"),
    (64, 2, 16, "float16")])
def test_compiled_kernel_ring_and_splits(block_s, stages, splits, rotation):
  """Ring slots, split counts and rotation types against the reference.
  16 splits of 64 rows leave 32 partials (two WGs each) for
  `combine_splits`, with empty splits past the shorter sequence."""
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=128,
                    k_rank=128, v_rank=128)
  cfg = mg.MosaicConfig(block_s=block_s, stages=stages, splits=splits,
                        rotation_dtype=rotation)
  for rope, mode in PATHS:
    assert check(spec, batch=2, cache_len=1024, lengths=[1024, 333],
                 dtype=jnp.bfloat16, rope=rope, bias=True, config=cfg,
                 mode=mode)


@gpu
@needs_hopper
@pytest.mark.parametrize("splits", [1, 5, 16])
@pytest.mark.parametrize("case", [GPU_GRID[i] for i in (1, 2, 4, 6)],
                         ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_merge_in_kernel(case, splits):
  """merge_in_kernel (v24) against the reference: the last WG of each
  program merges 2, 10 or 32 partials, empty splits past the shorter
  sequences included, on both paths."""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  for rope in (True, False):
    cfg = dataclasses.replace(mg.choose_config(
        spec, batch=batch, cache_len=s, rope=rope), splits=splits,
        merge_in_kernel=True)
    if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, cfg):
      continue
    assert check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=jnp.bfloat16, rope=rope, bias=True, config=cfg)


@gpu
@needs_hopper
@pytest.mark.parametrize("merge_wgs", [False, True],
                         ids=["per_wg", "merged"])
@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("case", [GPU_GRID[i] for i in (1, 2, 4, 6)],
                         ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_partials_per_wg(case, wgs, merge_wgs):
  """v29's switch forced both ways at 5 splits (empty ones past the
  shorter sequences), 2 and 3 compute WGs, both paths: every compute WG
  stores its own partial and XLA merges them all, or the WGs hand their
  partials down to WG 0 in the kernel. (The other compiled tests run
  what choose_config picks: merged up to 8 splits.)"""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  for rope in (True, False):
    cfg = dataclasses.replace(mg.choose_config(
        spec, batch=batch, cache_len=s, rope=rope, compute_wgs=wgs),
        splits=5, merge_wgs=merge_wgs)
    if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, cfg):
      continue
    assert check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=jnp.bfloat16, rope=rope, bias=True, config=cfg)


def check_fitting(spec, batch, s, lengths, configs, rope=True) -> int:
  """Each of `configs` that fits shared memory against the reference
  (bf16; with RoPE a key bias too) -> how many ran."""
  ran = 0
  for c in configs:
    if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, c):
      continue
    assert check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=jnp.bfloat16, rope=rope, bias=rope, config=c)
    ran += 1
  return ran


def _check_rebuild_early(spec, batch, s, lengths):
  """rebuild_early with the chosen config, and with 64-row tiles, one ring
  slot per WG and 3 splits; at least one of them fits."""
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=True), rebuild_early=True)
  assert check_fitting(spec, batch, s, lengths, (
      cfg, dataclasses.replace(cfg, block_s=64, stages=2, splits=3)))


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_GRID,
                         ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_rebuild_early(case):
  """rebuild_early (v30) against the reference on the RoPE grid (ragged
  lengths down to 1, GQA, a shared latent, the key bias): the chosen
  config, and 64-row tiles with one ring slot per WG and 3 splits (empty
  splits past the shorter sequences: a WG with no tile runs no tail)."""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  _check_rebuild_early(spec, batch, s, lengths)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [FP8_GPU_CASES[i] for i in (0, 1, 2, 4)],
                         ids=lambda c: "-".join(map(str, c[:6])))
def test_compiled_fp8_rebuild_early(case):
  """rebuild_early (v30) on float8 latents with RoPE (the e4m3 rebuild in
  flight while the previous tile's values are upcast), against the
  reference with the same e4m3 B_k; the chosen config and 64-row tiles."""
  g, j, qk, h, r, shared, batch, s, lengths = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  _check_rebuild_early(spec, batch, s, lengths)


# (G, J, Q, H, R, shared, batch, S, lengths, bits): caches whose length is
# a multiple of 256 (ragged lengths, GQA, a shared latent; float8 and int4
# with one scale per token and latent group)
TILE_256_CASES = [
    (8, 1, 1, 128, 64, False, 2, 1024, [1000, 64], 16),     # M-LRD
    (3, 1, 3, 64, 64, False, 2, 512, [511, 65], 16),        # SmolLM2-like
    (2, 2, 2, 64, 128, True, 2, 512, [512, 3], 16),         # shared latent
    (8, 1, 1, 128, 64, False, 2, 1024, [1000, 64], 8),      # float8 M-LRD
    (2, 1, 4, 128, 64, False, 3, 512, [512, 1, 200], 8),    # float8 GQA 4
    (4, 1, 1, 128, 64, False, 2, 512, [512, 65], 4),        # int4 M-LRD
]


def _tile_256_configs(case, rope):
  """A TILE_256_CASES case -> (spec, batch, S, lengths, the configs of
  256-row tiles that fit it: the chosen one where it takes them, and one
  ring slot per compute WG with one split and two)."""
  g, j, qk, h, r, shared, batch, s, lengths, bits = case
  if bits == 8:
    spec = _fp8_spec(g, j, qk, h, r, shared)
  elif bits == 4:
    spec = _int4_spec(g, j, qk, h, r, shared, None)
  else:
    spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                      k_rank=r, v_rank=r, shared=shared)
  base = mg.choose_config(spec, batch=batch, cache_len=s, rope=rope)
  configs = [base] * (base.block_s == 256) + [
      dataclasses.replace(base, block_s=256, stages=2, splits=splits)
      for splits in (1, 2)]
  return spec, batch, s, lengths, [
      c for c in configs
      if not mg.unsupported_reason(spec, jnp.bfloat16, s, rope, c)]


def test_choose_config_takes_256_rows_for_narrow_codes_without_rope():
  """The rule measured in v34 (NOTES.md): 256-row tiles in one ring slot
  per WG for float8 and raw int4 codes without RoPE where they fit; not
  with RoPE, not for 16-bit latents or int4 dequantized per quant group,
  not for Llama-2 G-LRD-4 (its values' 16-bit tiles do not fit)."""
  chosen = lambda spec, rope, s=65536: mg.choose_config(
      spec, batch=8, cache_len=s, rope=rope).block_s
  fp8_mlrd = _fp8_spec(32, 1, 1, 128, 64, False)
  int4_mlrd = _int4_spec(32, 1, 1, 128, 64, False, None)
  assert chosen(fp8_mlrd, False) == chosen(int4_mlrd, False) == 256
  # in one ring slot per compute WG (two measured slower)
  assert mg.choose_config(fp8_mlrd, batch=8, cache_len=65536,
                          rope=False).stages == mg.COMPUTE_WGS
  assert chosen(fp8_mlrd, False, s=65536 + 128) == 128   # not a multiple
  assert chosen(fp8_mlrd, True) == chosen(int4_mlrd, True) == 128
  assert chosen(_int4_spec(32, 1, 1, 128, 64, False), False) == 64
  assert chosen(LatentSpec(groups=32, kv_per_group=1, q_per_kv=1,
                           head_dim=128, k_rank=64, v_rank=64), False) == 128
  assert chosen(_fp8_spec(8, 4, 1, 128, 256, False), False) == 64


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", TILE_256_CASES,
                         ids=lambda c: "-".join(map(str, c[:6] + c[9:])))
def test_256_row_tiles_lower_for_sm90(case, rope):
  """The compiled test's configs lower for sm_90 on the CPU, and each case
  fits shared memory with one of them."""
  spec, batch, s, _, configs = _tile_256_configs(case, rope)
  assert configs
  for c in configs:
    assert "mosaic_gpu" in _lower(spec, batch, s, rope, config=c).as_text()


@gpu
@needs_hopper
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", TILE_256_CASES,
                         ids=lambda c: "-".join(map(str, c[:6] + c[9:])))
def test_compiled_256_row_tiles(case, rope):
  """Tiles of 256 rows (four 64-row sub-tiles per softmax update): the
  chosen config where it takes them (float8 and raw int4 codes without
  RoPE), and one ring slot per compute WG with one split and two, against
  the reference; at least one of them fits each case."""
  spec, batch, s, lengths, configs = _tile_256_configs(case, rope)
  assert configs
  assert check_fitting(spec, batch, s, lengths, configs, rope) == len(configs)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [GPU_GRID[i] for i in (0, 3, 4, 5, 6)],
                         ids=lambda c: "-".join(map(str, c[:7])))
@pytest.mark.parametrize("private", [True, False],
                         ids=["private_reductions", "turns"])
def test_compiled_three_compute_warpgroups(case, private):
  """Three compute WGs (ring slots a multiple of three, 160 registers
  each), reducing through their own scratch or taking turns on Pallas's
  one scratch (a ring of three barriers)."""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  for rope in (True, False):
    cfg = dataclasses.replace(mg.choose_config(
        spec, batch=batch, cache_len=s, rope=rope, compute_wgs=3),
        private_reductions=private)
    if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, cfg):
      continue
    assert check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=jnp.bfloat16, rope=rope, bias=rope, config=cfg)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [
    (4, 2, 2, 128, 128, 128, False, 2, 256, [130, 256]),   # G-LRD-2
    (2, 2, 2, 64, 128, 128, True, 2, 256, [256, 3]),       # shared latent
    (1, 3, 3, 64, 192, 192, True, 2, 512, [512, 77]),      # SmolLM2
    (2, 4, 1, 64, 64, 64, False, 3, 320, [1, 319, 200]),   # 4 heads of 64
], ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_several_kv_heads_per_cta(case):
  """One CTA for several KV heads of a group (every divisor that fits),
  against the reference, with the key bias."""
  g, j, qk, h, rk, rv, shared, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared)
  ran = 0
  for hc in [d for d in range(2, j + 1) if j % d == 0]:
    cfg = mg.choose_config(spec, batch=batch, cache_len=s, rope=True,
                           kv_heads_per_cta=hc)
    # fused heads: off by default, an option (compiled tests passed in
    # run 5 of eval/results/kernel_tests_h200.txt)
    ran += check_fitting(spec, batch, s, lengths, (
        cfg, dataclasses.replace(cfg, splits=1),
        dataclasses.replace(cfg, fuse_heads=True)))
  assert ran


@gpu
@needs_hopper
@pytest.mark.parametrize("rope,mode", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", [
    (8, 1, 1, 128, 96, 96, False, 2, 256, [256, 70]),      # M-LRD 30 %
    (2, 2, 2, 128, 176, 176, False, 2, 256, [130, 256]),   # G-LRD-2 30 %
    (1, 3, 3, 64, 272, 272, True, 2, 320, [320, 1]),       # SmolLM2 30 %
    (2, 1, 2, 64, 32, 80, False, 1, 128, [100]),           # R_v = 80
], ids=lambda c: "-".join(map(str, c[:7])))
def test_compiled_value_ranks_not_multiples_of_64(case, rope, mode):
  check_grid_case(case, rope, mode, value_pieces=True)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", FP8_GPU_CASES,
                         ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("path", ["rope", "norope", "fp8_scores",
                                  "fp8_scores_one_acc",
                                  "fp8_scores_values_during_scores"])
def test_compiled_fp8_kernel_matches_reference(case, path):
  """float8 caches written by the model's quantizer (make_inputs), the
  reference dequantizing the same codes (and, with RoPE, the same e4m3
  B_k). fp8_scores: scores straight from the e4m3 key codes against the
  query's hi + lo e4m3 parts (the reference keeps the query exact, so this
  also bounds that rounding); _one_acc: all of them into one accumulator
  (failed for short sequences on the H200 on 2026-12-03; the default gives
  each part and latent chunk its own); _values_during_scores: the values
  upcast during the score wgmma, not after the softmax (the default)."""
  g, j, qk, h, r, shared, batch, s, lengths = case
  rope = path == "rope"
  native = path.startswith("fp8_scores")
  if native and shared:
    pytest.skip("fp8_scores needs a key latent of its own")
  spec = _fp8_spec(g, j, qk, h, r, shared)
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), fp8_latents=True,
      fp8_scores=native, fp8_promote=path != "fp8_scores_one_acc",
      values_during_scores=path.endswith("during_scores"))
  for c in (cfg, dataclasses.replace(cfg, block_s=64, stages=2, splits=3)):
    if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, c):
      continue
    assert check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=jnp.bfloat16, rope=rope, bias=rope, config=c)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [
    (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),      # G-LRD-4
    (2, 4, 4, 128, 256, False, 3, 448, [448, 1, 200]),  # GQA 4
    (8, 4, 1, 128, 256, False, 1, 4096, [4001]),        # Llama-2 G-LRD-4
    (2, 2, 2, 64, 256, True, 2, 320, [320, 65]),        # shared latent
], ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("variant", INT4_VARIANTS)
def test_compiled_int4_kernel_matches_reference(case, variant):
  """4-bit caches written by the model's quantizer (make_inputs: codes,
  scale and offset per group of 32), the reference dequantizing the same
  codes; the chosen config and 64-row tiles with 3 splits."""
  assert _check_int4_case(case, variant, rope=False)


def _check_int4_case(case, variant, rope, quant_group=32,
                     dtype=jnp.bfloat16):
  """The chosen config with the variant's changes and 64-row tiles with 3
  splits, each the shape takes, against the reference (key bias with
  RoPE); how many ran."""
  g, j, qk, h, r, shared, batch, s, lengths = case
  spec = _int4_spec(g, j, qk, h, r, shared, quant_group)
  changes = {**INT4_VARIANTS, **TOKEN_VARIANTS,
             "int8_rebuild": dict(int4_int8_rebuild=True)}[variant]
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), **changes)
  ran = 0
  for c in (cfg, dataclasses.replace(cfg, block_s=64, stages=2, splits=3)):
    if mg.unsupported_reason(spec, dtype, s, rope, c):
      continue
    ran += check(spec, batch=batch, cache_len=s, lengths=lengths,
                 dtype=dtype, rope=rope, bias=rope, config=c)
  return ran


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [
    (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),      # G-LRD-4
    (2, 4, 4, 128, 256, False, 3, 448, [448, 1, 200]),  # GQA 4
    (2, 2, 2, 64, 256, True, 2, 320, [320, 65]),        # shared latent
], ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("variant", ["default", "steps", "relayout",
                                     "keys_in_registers"])
def test_compiled_int4_rope_kernel_matches_reference(case, variant):
  """4-bit caches with RoPE: the codes dequantized in registers (B_k's
  rows permuted to their column order), the keys rebuilt by a wgmma from
  the WG's tile (default) or from registers, rotated and scored; key bias
  on; against the reference on the same codes."""
  assert _check_int4_case(case, variant, rope=True)


@gpu
@needs_hopper
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("case", [
    (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),      # G-LRD-4
    (2, 4, 4, 128, 256, False, 3, 448, [448, 1, 200]),  # GQA 4
    (4, 1, 1, 128, 64, False, 2, 320, [320, 65]),       # M-LRD
    (2, 2, 2, 64, 256, True, 2, 320, [320, 65]),        # shared latent
], ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
def test_compiled_int4_token_scales_match_reference(case, variant, rope):
  """4-bit caches with one scale and offset per token and latent group
  (the quantizer's quant_group = the rank): token-major scale rows, the
  reference dequantizing the same codes."""
  assert _check_int4_case(case, variant, rope, quant_group=None)


@gpu
@needs_hopper
@pytest.mark.parametrize("case", [
    (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),      # G-LRD-4
    (2, 4, 4, 128, 256, False, 3, 448, [448, 1, 200]),  # GQA 4
    (4, 1, 1, 128, 64, False, 2, 320, [320, 65]),       # M-LRD
    (2, 2, 2, 128, 128, False, 2, 384, [384, 130]),     # G-LRD-2
], ids=lambda c: "-".join(map(str, c[:6])))
def test_compiled_int4_int8_rebuild_matches_reference(case):
  """int4_int8_rebuild: 4-bit keys with one scale and offset per token
  turned into int8 bytes (permuted columns, B_k's rows to match) and
  multiplied by the int8-rounded B_k on the tensor core, K = s·β·(c·b) +
  z·Σβ·b; against the reference on the same codes with the same rounded
  B_k (key bias on), the chosen config and 64-row tiles with 3 splits."""
  assert _check_int4_case(case, "int8_rebuild", rope=True,
                          quant_group=None)


@gpu
@needs_hopper
def test_compiled_int4_kernel_float16():
  """float16 queries and scales: the fused routine with f16's magic
  (1024 + c) and packed f16 arithmetic; without it (`int4_fused=False`)
  Mosaic GPU's generic int4 -> f16 conversion. Both must match the
  reference."""
  spec = _int4_spec(2, 4, 1, 128, 256, False)
  cfg = mg.choose_config(spec, batch=2, cache_len=512, rope=False)
  for fused in (True, False):
    assert check(spec, batch=2, cache_len=512, lengths=[512, 77],
                 dtype=jnp.float16, rope=False,
                 config=dataclasses.replace(cfg, int4_fused=fused))


@gpu
@needs_hopper
@pytest.mark.parametrize("variant", ["default", "dequantized_values"])
def test_compiled_int4_token_scales_float16(variant):
  """float16 with one scale per token, no RoPE: the keys' magic 1024 + c
  and, by default (int4_raw_values), the values' centered codes (1024 + c
  minus the packed 1032: c - 8) with p·scale rounded to f16; 128-row
  tiles (the choice with raw values) and 64-row tiles with 3 splits,
  ragged lengths. Both must run and match the reference."""
  case = (2, 4, 1, 128, 256, False, 2, 512, [512, 77])
  assert _check_int4_case(case, variant, False, quant_group=None,
                          dtype=jnp.float16) == 2


@gpu
@needs_hopper
@pytest.mark.parametrize("mode", ["rebuild", "fold"])
def test_compiled_rows_past_the_length_do_not_matter(mode):
  spec = LatentSpec(groups=1, kv_per_group=2, q_per_kv=1, head_dim=128,
                    k_rank=128, v_rank=128)
  q, hk, hv, k_up, _, inv = make_inputs(spec, 1, 128, jnp.bfloat16)
  lengths = jnp.asarray([21], jnp.int32)
  cfg = mg.MosaicConfig(rope_mode=mode)
  base = mg.latent_attention(q, hk, hv, k_up, lengths, spec=spec,
                             inv_freq=inv, config=cfg)
  out = mg.latent_attention(q, hk.at[:, 40:].set(1e4),
                            hv.at[:, 30:].set(jnp.inf), k_up, lengths,
                            spec=spec, inv_freq=inv, config=cfg)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


@gpu
@needs_hopper
@pytest.mark.parametrize("mask_last", [False, True],
                         ids=["per_tile", "mask_last"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", [FP8_GPU_CASES[i] for i in (0, 1, 2)],
                         ids=lambda c: "-".join(map(str, c[:6])))
def test_compiled_fp8_rows_past_the_length_do_not_matter(case, rope,
                                                         mask_last):
  """float8 caches with NaN codes past every sequence's length (and, with
  fp8_mask_last, infinite scales there too): the output equals the clean
  cache's bit for bit, for the values cleared in every tile's upcast
  (fp8_mask_last=False) and in the last tile only (the default)."""
  check_fp8_rows_past(case, rope, fp8_mask_last=mask_last)


def check_fp8_rows_past(case, rope, **changes):
  """An FP8_GPU_CASES case with NaN codes past every sequence's length (and,
  with fp8_mask_last, infinite scales there too) gives the clean cache's
  output bit for bit, and the reference's, with the chosen config and
  `changes` to it; skips a config the shape cannot take."""
  g, j, qk, h, r, shared, batch, s, lengths = case
  spec = _fp8_spec(g, j, qk, h, r, shared)
  cfg = dataclasses.replace(mg.choose_config(
      spec, batch=batch, cache_len=s, rope=rope), **changes)
  mask_last = cfg.fp8_mask_last
  q, hk, hv, k_up, k_bias, inv = make_inputs(spec, batch, s, jnp.bfloat16)
  if rope:
    k_up = e4m3_rebuild_weight(k_up, spec, jnp.bfloat16)
  lens = jnp.asarray(lengths, jnp.int32)
  past = jnp.arange(s)[None, :] >= lens[:, None]               # [B, S]

  def spoil(side):
    if side is None:
      return None
    codes = jnp.where(past[..., None], jnp.asarray(jnp.nan, side.codes.dtype),
                      side.codes)
    scale = (jnp.where(past[..., None], jnp.inf, side.scale).astype(
        side.scale.dtype) if mask_last else side.scale)
    return side._replace(codes=codes, scale=scale)
  if mg.unsupported_reason(spec, jnp.bfloat16, s, rope, cfg):
    pytest.skip("does not fit")
  kw = dict(spec=spec, inv_freq=inv if rope else None,
            k_bias=k_bias if rope else None, config=cfg)
  clean = mg.latent_attention(q, hk, hv, k_up, lens, **kw)
  spoiled = mg.latent_attention(q, spoil(hk), spoil(hv), k_up, lens, **kw)
  assert np.all(np.isfinite(np.asarray(clean)))
  np.testing.assert_array_equal(np.asarray(spoiled), np.asarray(clean))
  # and the option computes what the reference does
  assert check(spec, batch=batch, cache_len=s, lengths=lengths,
               dtype=jnp.bfloat16, rope=rope, bias=rope, config=cfg)


@gpu
@needs_hopper
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_compiled_kernel_random_shapes(data):
  j = data.draw(st.sampled_from([1, 2, 4]))
  spec = LatentSpec(
      groups=data.draw(st.integers(1, 3)), kv_per_group=j,
      q_per_kv=data.draw(st.sampled_from([1, 2, 3, 8])),
      head_dim=data.draw(st.sampled_from([64, 128])),
      k_rank=data.draw(st.sampled_from([32, 64, 128, 192])),
      v_rank=data.draw(st.sampled_from([64, 128])))
  batch = data.draw(st.integers(1, 3))
  s = 64 * data.draw(st.integers(1, 8))
  lengths = [data.draw(st.integers(1, s)) for _ in range(batch)]
  rope, mode = data.draw(st.sampled_from(PATHS))
  check(spec, batch=batch, cache_len=s, lengths=lengths, dtype=jnp.bfloat16,
        rope=rope, bias=True, mode=mode)
