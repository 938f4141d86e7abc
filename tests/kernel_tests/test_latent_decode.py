"""Latent decode kernels against their pure-jnp references.

On the CPU the kernels run in Pallas interpret mode; run this file with
JAX_PLATFORMS=cuda on a GPU and they are compiled by Triton instead (the
same grid). Quantized caches are built with `palu_jax.quantize.int_quant`
(the model's writer), so kernel and reference read the same codes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import api
from pallas_kernels.absorb_attention import (absorb_attention,
                                             absorb_attention_reference)
from pallas_kernels.common import (KernelConfig, LatentSpec, QuantLatent,
                                   piece_layout, pow2_chunks, rank_unit,
                                   unpack_codes)
from pallas_kernels.latent_rope_attention import (
    latent_rope_attention, latent_rope_attention_reference)
from palu_jax.quantize import fp8_quant, int_quant

INTERPRET = jax.default_backend() != "gpu"
# |kernel - reference| <= TOL·max|reference|: with 16-bit inputs the kernel
# rounds rotated keys and probabilities where the reference keeps f32; with
# float32 inputs both compute exact products with f32 sums.
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 1e-5}

OPS = {True: (latent_rope_attention, latent_rope_attention_reference),
       False: (absorb_attention, absorb_attention_reference)}


def make_inputs(spec: LatentSpec, batch: int, cache_len: int, dtype,
                seed: int = 0):
  rng = np.random.default_rng(seed)
  h = spec.head_dim
  q = jnp.asarray(rng.standard_normal((batch, spec.n_heads, h)), dtype)

  def side(rank):
    x = jnp.asarray(rng.standard_normal((batch, cache_len,
                                         spec.groups * rank)), dtype)
    if spec.bits == 16:
      return x
    if spec.bits == 8:
      codes, scale = fp8_quant.quantize(x, group=spec.quant_group,
                                        scale_dtype=dtype)
      return QuantLatent(codes, scale, jnp.zeros(scale.shape[:2] + (0,),
                                                 dtype))
    codes, scale, offset = int_quant.quantize(
        x, bits=spec.bits, group=spec.quant_group, scale_dtype=dtype)
    return QuantLatent(int_quant.pack(codes, spec.bits), scale, offset)

  hk = side(spec.k_rank)
  hv = None if spec.shared else side(spec.v_rank)
  k_up = jnp.asarray(rng.standard_normal(
      (spec.groups * spec.k_rank, spec.kv_per_group * h)) / np.sqrt(
          spec.k_rank), dtype)
  k_bias = jnp.asarray(rng.standard_normal(
      (spec.groups * spec.kv_per_group * h,)) * 0.1, dtype)
  inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, h, 2) / h), jnp.float32)
  return q, hk, hv, k_up, k_bias, inv_freq


def check(spec, *, batch, cache_len, lengths, dtype, rope, config,
          bias=False, seed=0):
  q, hk, hv, k_up, k_bias, inv = make_inputs(spec, batch, cache_len, dtype,
                                             seed)
  op, ref = OPS[rope]
  kw = dict(spec=spec, inv_freq=inv if rope else None,
            k_bias=k_bias if bias else None)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = op(q, hk, hv, k_up, lengths, config=config, interpret=INTERPRET, **kw)
  # exact f32 dots in the reference too (XLA's default on a GPU is TF32)
  with jax.default_matmul_precision("highest"):
    want = ref(q, hk, hv, k_up, lengths, **kw)
  assert out.shape == (batch, spec.n_heads, spec.v_rank)
  assert out.dtype == jnp.float32
  out, want = np.asarray(out), np.asarray(want)
  assert np.all(np.isfinite(out))
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(out, want, atol=TOL[dtype] * scale, rtol=0)
  return out, want


GRID = [
    # (groups, J, Q, H, k_rank, v_rank, shared, bits, batch, S, lengths)
    (1, 1, 1, 16, 16, 16, False, 16, 1, 32, [1]),
    (2, 2, 2, 32, 48, 32, False, 16, 3, 64, [64, 1, 37]),
    (1, 3, 3, 64, 96, 96, True, 16, 2, 96, [95, 50]),      # J=3: padded tiles
    (2, 1, 4, 48, 32, 48, False, 16, 2, 48, [17, 48]),      # H/2 = 24
    (1, 2, 1, 128, 80, 80, True, 16, 1, 64, [33]),
    (2, 2, 2, 32, 64, 64, False, 8, 2, 64, [64, 9]),       # float8 e4m3
    (1, 2, 2, 32, 96, 96, True, 8, 2, 64, [40, 1]),
    (2, 2, 2, 32, 64, 64, False, 4, 2, 64, [64, 9]),
    (1, 2, 2, 32, 96, 96, True, 4, 2, 64, [40, 1]),        # 64 + 32 chunks
    (2, 2, 1, 32, 64, 64, False, 3, 2, 48, [48, 20]),
    (1, 1, 2, 64, 64, 64, True, 3, 1, 32, [31]),
    (2, 2, 2, 32, 64, 64, False, 2, 2, 64, [3, 64]),
    (1, 4, 1, 16, 64, 64, True, 2, 3, 32, [32, 16, 5]),
]


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c[:8])))
def test_kernel_matches_reference(case, rope):
  g, j, qk, h, rk, rv, shared, bits, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared, bits=bits)
  check(spec, batch=batch, cache_len=s, lengths=lengths, dtype=jnp.bfloat16,
        rope=rope, config=KernelConfig(block_s=16, splits=2), bias=rope)


@pytest.mark.parametrize("case", [GRID[1], GRID[2], GRID[7]],
                         ids=lambda c: "-".join(map(str, c[:8])))
@pytest.mark.parametrize("resident", [True, False])
def test_rope_kernel_b_on_chip_or_reread_per_tile(case, resident):
  """Both branches of the RoPE score: B_k held on chip across the loop
  (small groups), or a loop over KV heads that reads each head's slice of
  B_k per tile (the default for groups too large to hold)."""
  g, j, qk, h, rk, rv, shared, bits, batch, s, lengths = case
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h,
                    k_rank=rk, v_rank=rv, shared=shared, bits=bits)
  check(spec, batch=batch, cache_len=s, lengths=lengths, dtype=jnp.bfloat16,
        rope=True, bias=True,
        config=KernelConfig(block_s=16, splits=2, resident_b=resident))


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_float16_float32_and_splits(rope, bits, dtype):
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=32,
                    k_rank=32, v_rank=32, bits=bits)
  for splits in (1, 3):   # 3 splits of a 64-row cache in 16-row tiles: 2+2+0
    check(spec, batch=2, cache_len=64, lengths=[64, 18], dtype=dtype,
          rope=rope, config=KernelConfig(block_s=16, splits=splits))


def test_rows_past_the_length_do_not_matter():
  """Garbage (even inf) beyond a sequence's length changes nothing."""
  spec = LatentSpec(groups=1, kv_per_group=2, q_per_kv=1, head_dim=32,
                    k_rank=32, v_rank=32)
  q, hk, hv, k_up, _, inv = make_inputs(spec, 1, 64, jnp.bfloat16)
  lengths = jnp.asarray([21], jnp.int32)
  cfg = KernelConfig(block_s=16, splits=2)
  base = latent_rope_attention(q, hk, hv, k_up, lengths, spec=spec,
                               inv_freq=inv, config=cfg, interpret=INTERPRET)
  hk2 = hk.at[:, 40:].set(1e4)
  hv2 = hv.at[:, 40:].set(jnp.inf)
  out = latent_rope_attention(q, hk2, hv2, k_up, lengths, spec=spec,
                              inv_freq=inv, config=cfg, interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_rope_reference_equals_model_attention():
  """The RoPE reference agrees with the model's own latent attention math:
  keys rebuilt per group, rotated by `palu_jax.model.layers.apply_rope`."""
  from palu_jax.model.layers import apply_rope, rope_cos_sin
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=16,
                    k_rank=16, v_rank=16)
  q, hk, hv, k_up, _, inv = make_inputs(spec, 1, 16, jnp.float16)
  q, hk, hv, k_up = (x.astype(jnp.float32) for x in (q, hk, hv, k_up))
  got = latent_rope_attention_reference(
      q.astype(jnp.float16), hk.astype(jnp.float16), hv.astype(jnp.float16),
      k_up.astype(jnp.float16), jnp.asarray([10]), spec=spec, inv_freq=inv)
  cos, sin = rope_cos_sin(jnp.arange(16)[None], np.asarray(inv))
  want = []
  for g in range(2):
    k = hk[0, :, g * 16:(g + 1) * 16] @ k_up[g * 16:(g + 1) * 16]
    k = apply_rope(k.reshape(1, 16, 2, 16), cos, sin)[0]        # [S, J, H]
    for n in range(4):
      s = (k[:10, n // 2] @ q[0, g * 4 + n]) / 4.0
      p = jax.nn.softmax(s)
      want.append(p @ hv[0, :10, g * 16:(g + 1) * 16])
  np.testing.assert_allclose(np.asarray(got[0]), np.stack(want), atol=2e-2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_unpack_equals_int_quant(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (3, 40))
  packed = int_quant.pack(jnp.asarray(codes, jnp.uint8), bits)
  np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, 40)),
                                codes)


def test_pow2_chunks():
  assert pow2_chunks(80) == ((0, 64), (64, 16))
  assert pow2_chunks(96, 32) == ((0, 64), (64, 32))
  spec = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=16,
                    k_rank=96, v_rank=96, bits=4)
  assert piece_layout(spec, 96) == ((0, 32, 2), (1, 32, 2), (64, 16, 2),
                                    (65, 16, 2))
  assert rank_unit(spec) == 32
  assert rank_unit(LatentSpec(groups=1, kv_per_group=1, q_per_kv=1,
                              head_dim=16, k_rank=64, v_rank=64, bits=2)) == 64
  assert pow2_chunks(256) == ((0, 256),)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_supported_shapes(data):
  bits = data.draw(st.sampled_from([16, 8, 4, 3, 2]))
  unit = {16: 16, 8: 32, 4: 32, 3: 64, 2: 64}[bits]
  spec = LatentSpec(
      groups=data.draw(st.integers(1, 2)),
      kv_per_group=data.draw(st.integers(1, 3)),
      q_per_kv=data.draw(st.integers(1, 3)),
      head_dim=16 * data.draw(st.integers(1, 4)),
      k_rank=unit * data.draw(st.integers(1, 3)),
      v_rank=unit * data.draw(st.integers(1, 3)),
      bits=bits)
  if data.draw(st.booleans()):
    spec = LatentSpec(**{**{f: getattr(spec, f) for f in spec.__slots__},
                         "v_rank": spec.k_rank, "shared": True})
  batch = data.draw(st.integers(1, 3))
  cache_len = 16 * data.draw(st.integers(1, 4))
  lengths = [data.draw(st.integers(1, cache_len)) for _ in range(batch)]
  config = KernelConfig(block_s=16, splits=data.draw(st.integers(1, 3)))
  check(spec, batch=batch, cache_len=cache_len, lengths=lengths,
        dtype=jnp.bfloat16, rope=data.draw(st.booleans()), config=config,
        seed=data.draw(st.integers(0, 99)))


class TestApi:

  def test_xla_and_pallas_agree_and_fallback_logs(self, caplog):
    spec = LatentSpec(groups=1, kv_per_group=2, q_per_kv=2, head_dim=32,
                      k_rank=32, v_rank=32, bits=4)
    q, hk, hv, k_up, _, inv = make_inputs(spec, 2, 32, jnp.bfloat16)
    lengths = jnp.asarray([32, 7])
    outs = [api.latent_decode_attention(q, hk, hv, k_up, lengths, spec=spec,
                                        inv_freq=inv, implementation=impl)
            for impl in ("xla", "pallas", None)]
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-2 * np.max(
        np.abs(np.asarray(outs[0]))))
    # int8 queries are not supported by the kernel: reference + a log
    with caplog.at_level("WARNING"):
      out = api.latent_decode_attention(q.astype(jnp.int8), hk, hv, k_up,
                                        lengths, spec=spec, inv_freq=inv,
                                        implementation="pallas")
    assert "dtype int8" in caplog.text
    assert out.shape == (2, 4, 32)

  def test_unsupported_reasons(self):
    spec = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=40,
                      k_rank=32, v_rank=32)
    q = jnp.zeros((1, 1, 40), jnp.bfloat16)
    assert "head_dim 40" in api.unsupported_reason(spec, q, 64)
    spec = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=32,
                      k_rank=40, v_rank=32)
    assert "k_rank 40" in api.unsupported_reason(spec, q, 64)
    spec = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=32,
                      k_rank=48, v_rank=48, bits=4)
    assert "k_rank 48 (needs a positive multiple of 32 at 4 bits)" in \
        api.unsupported_reason(spec, q, 64)
    spec = LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=32,
                      k_rank=32, v_rank=32, bits=2)
    assert "multiple of 64 at 2 bits" in api.unsupported_reason(spec, q, 64)
    assert "cache length 40" in api.unsupported_reason(
        LatentSpec(groups=1, kv_per_group=1, q_per_kv=1, head_dim=32,
                   k_rank=32, v_rank=32), q, 40)
    with pytest.raises(ValueError, match="implementation"):
      api.latent_decode_attention(q, None, None, None, None, spec=spec,
                                  inv_freq=None, implementation="cuda")
