"""float8 (e4m3) latent codes: rounding bounds, storage and accounting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.kv_report import kv_bytes_per_token
from palu_jax.model.cache import init_quant_latent_cache
from palu_jax.quantize import fp8_quant, latent_codes


def _latents(seed=0, shape=(3, 5, 64)):
  rng = np.random.default_rng(seed)
  # outlier-heavy, as latents are: a few large values per token
  x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("group", [8, 32, 64])
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16])
def test_round_trip_within_half_an_e4m3_step(group, scale_dtype):
  """Each value comes back within half an e4m3 step of x/scale: 2^-4 of
  |x| for normals (3 mantissa bits), 2^-10·scale below the smallest normal
  (subnormal step 2^-9). The bound is derived from the format, not from
  the implementation."""
  x = _latents()
  codes, scale = fp8_quant.quantize(x, group=group, scale_dtype=scale_dtype)
  assert codes.dtype == jnp.float8_e4m3fn and codes.shape == x.shape
  assert scale.dtype == scale_dtype and scale.shape == (3, 5, 64 // group)
  back = np.asarray(fp8_quant.dequantize(codes, scale, group=group))
  s = np.repeat(np.asarray(scale, np.float64), group, -1)
  xs = np.asarray(x, np.float64)
  bound = 2.0 ** -4 * np.abs(xs) + 2.0 ** -10 * s
  assert np.all(np.abs(back - xs) <= bound * (1 + 1e-6))
  # the scale is rounded up, so no code saturates at 448
  codes_f = np.abs(np.asarray(codes.astype(jnp.float32)))
  assert codes_f.max() <= 448.0 and np.isfinite(codes_f).all()


def test_zero_groups_and_gradient():
  x = jnp.zeros((2, 16)).at[0, :8].set(3.0)
  out = np.asarray(fp8_quant.fake_quantize(x, group=8))
  assert np.all(out[0, 8:] == 0) and np.all(out[1] == 0)   # no 0/0 NaN
  np.testing.assert_allclose(out[0, :8], 3.0, rtol=2.0 ** -4)
  # straight-through: the gradient of fake quantization is the identity
  g = jax.grad(lambda v: jnp.sum(fp8_quant.fake_quantize(v, group=8) * 2.0))(
      _latents(shape=(4, 16)))
  np.testing.assert_array_equal(np.asarray(g), 2.0)


def test_cache_stores_what_fake_quant_gives():
  """Written to and read from a cache, latents equal the fake-quantized
  ones (the forward without a cache applies this very rounding)."""
  h = _latents(1, (2, 6, 32))
  cache = init_quant_latent_cache([32], [0], 2, 8, bits=8, group=16,
                                  scale_dtype=jnp.bfloat16)
  layer = cache.layers[0].write(h, h[..., :0], jnp.asarray([0, 2]))
  assert layer.k_codes.dtype == jnp.float8_e4m3fn
  assert layer.k_offset.shape == (2, 8, 0)      # fp8 stores no offset
  hk, _ = layer.read(jnp.float32)
  want = latent_codes.fake_quantize(h, bits=8, group=16)
  np.testing.assert_array_equal(np.asarray(hk[0, :6]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(hk[1, 2:8]), np.asarray(want[1]))


def test_bytes_per_token_are_the_arrays_bytes():
  """1 byte per latent + a 2-byte scale per group, no offset."""
  cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=16, hidden_dim=96)
  palu = PaluConfig(group_size=2, k_ranks=((16,), (32,)),
                    v_ranks=((16,), (32,)), kv_bits=8, quant_group=16)
  palu.validate(cfg)
  want = (16 + 2) * 2 + (32 + 4) * 2
  assert kv_bytes_per_token(cfg, palu) == want
  cache = init_quant_latent_cache([16, 32], [16, 32], 3, 10, bits=8,
                                  group=16, scale_dtype=jnp.bfloat16)
  assert cache.nbytes() == 3 * 10 * want


@pytest.mark.parametrize("rope", [True, False])
def test_decode_api_reads_fp8_latents(rope):
  """The kernels' api takes an fp8 cache side (QuantLatent with float8
  codes and no offset): the Triton kernel (interpret mode on the CPU)
  attends over exactly the dequantized latents, as the reference does on
  16-bit copies of them (f32 inputs: the kernels' f32 tolerance, 1e-5 of
  the largest output, as in tests/kernel_tests)."""
  import dataclasses

  from pallas_kernels.common import LatentSpec, QuantLatent
  from pallas_kernels.latent_attention.api import latent_decode_attention
  spec = LatentSpec(groups=2, kv_per_group=2, q_per_kv=2, head_dim=16,
                    k_rank=32, v_rank=32, bits=8, quant_group=16)
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((2, spec.n_heads, 16)), jnp.float32)
  k_up = jnp.asarray(rng.standard_normal((64, 32)) / 6, jnp.float32)
  inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, 16, 2) / 16), jnp.float32)
  lengths = jnp.asarray([40, 17], jnp.int32)
  sides, plain = [], []
  for seed in (5, 6):
    h = _latents(seed, (2, 48, 64))
    sides.append(QuantLatent(*latent_codes.quantize(h, bits=8, group=16)))
    plain.append(latent_codes.fake_quantize(h, bits=8, group=16))
  kw = dict(inv_freq=inv if rope else None, implementation="triton")
  got = latent_decode_attention(q, *sides, k_up, lengths, spec=spec, **kw)
  want = latent_decode_attention(q, *plain, k_up, lengths,
                                 spec=dataclasses.replace(spec, bits=16),
                                 inv_freq=kw["inv_freq"],
                                 implementation="xla")
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


def test_scales_are_powers_of_two_so_products_are_exact():
  """code·scale is exactly representable in bf16: dequantizing straight to
  bf16 equals dequantizing in f32 (no second rounding)."""
  x = _latents(7, (4, 9, 64))
  codes, scale = fp8_quant.quantize(x, group=32)
  s = np.asarray(scale, np.float32)
  np.testing.assert_array_equal(s, 2.0 ** np.round(np.log2(s)))
  in_f32 = fp8_quant.dequantize(codes, scale, group=32, dtype=jnp.float32)
  in_bf16 = fp8_quant.dequantize(codes, scale, group=32, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(in_bf16, np.float32),
                                np.asarray(in_f32))


def test_one_scale_per_token_and_latent_group():
  """quant_group 0: each layer's scales cover one latent group (its rank;
  the gcd of the ranks when they differ), the cache holds one scale per
  token and group, and the bytes are the arrays' bytes. The model's
  kernel spec then has quant_group = the rank: the float8 format the Mosaic
  GPU kernel reads (`unsupported_reason` accepts it)."""
  from flax import nnx

  from palu_jax.model.transformer import Transformer
  from pallas_kernels.latent_attention import mosaic_gpu as mg
  cfg = ModelConfig(vocab_size=97, dim=256, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=64, hidden_dim=96)
  palu = PaluConfig(group_size=1, k_ranks=((64, 64), (16, 24)),
                    v_ranks=((64, 64), (16, 24)), kv_bits=8, quant_group=0)
  palu.validate(cfg)
  assert [palu.layer_quant_group(i) for i in range(2)] == [64, 8]
  # layer 0: 2 groups of 64 (+ one scale each), layer 1: 40 latents in
  # 5 groups of 8; keys and values
  want = 2 * (128 + 2 * 2) + 2 * (40 + 5 * 2)
  assert kv_bytes_per_token(cfg, palu) == want
  model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), palu=palu)
  cache = model.init_cache(2, 8)
  assert cache.nbytes() == 2 * cache.layers[0].k_codes.shape[1] * want
  assert cache.layers[0].k_scale.shape[-1] == 2
  assert cache.layers[1].k_scale.shape[-1] == 5
  spec = model.layers[0].attn.kernel_spec()
  assert spec.quant_group == spec.k_rank == 64
  # B_k kept in 16 bits (the default): the kernel's fp8 rebuild would round
  # it, so it takes the calls without RoPE only; with --k-up-bits 8 both
  assert spec.k_up_bits == 16
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, False,
                               mg.MosaicConfig()) is None
  assert "--k-up-bits 8" in mg.unsupported_reason(
      spec, jnp.bfloat16, 1024, True, mg.MosaicConfig())
  e4m3 = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0),
                     palu=dataclasses.replace(palu, k_up_bits=8))
  spec = e4m3.layers[0].attn.kernel_spec()
  assert spec.k_up_bits == 8
  assert mg.unsupported_reason(spec, jnp.bfloat16, 1024, True,
                               mg.MosaicConfig()) is None
  assert model.layers[1].attn.kernel_spec() is None     # unequal ranks


def test_negative_quant_group_is_refused():
  from palu_jax.compress import CompressionConfig
  from palu_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="quant_group"):
    CompressionConfig(quant_group=-1)
  assert CompressionConfig(kv_bits=8, quant_group=0).quant_group == 0


def test_fake_quantize_inside_a_jit_rounds_as_the_cache_does():
  """The fake quantization inside one jitted computation (as the cache-free
  forward runs it) equals the codes a cache stores, decoded in separate
  dispatches, bit for bit, and differs from x. XLA:GPU folds a chain of
  float conversions f32 -> e4m3 -> f32 into nothing unless the codes sit
  behind a barrier (`pallas_kernels.common.narrow_values`): before the
  barrier, fp8 perplexity on the H200 measured unrounded latents. On the
  CPU the conversions always stay; the test matters on the GPU (the device
  plan in pallas_kernels/latent_attention/NOTES.md runs it there)."""
  x = _latents(3)
  in_jit = jax.jit(lambda v: 2.0 * fp8_quant.fake_quantize(v, group=32))(x)
  codes, scale = fp8_quant.quantize(x, group=32)   # dispatched on its own
  stored = jnp.asarray(np.asarray(codes))          # what a cache holds
  want = 2.0 * np.asarray(fp8_quant.dequantize(stored, scale, group=32))
  np.testing.assert_array_equal(np.asarray(in_jit), want)
  assert np.any(np.asarray(in_jit) != 2.0 * np.asarray(x))


def test_scale_is_the_smallest_exact_power_of_two_at_or_above_amax_over_448():
  """`pow2_scale` against Python's exact arithmetic (math.frexp/ldexp on
  doubles, independent of jnp's log2/exp2): an exact power of two (code ·
  scale is exact), at or above amax/448, and the smallest such within the
  dtype's exponent range; including amax exactly on a boundary (448·2^k),
  where an approximate log2 picks twice the scale."""
  import math
  rng = np.random.default_rng(0)
  amax = np.concatenate([rng.lognormal(0.0, 6.0, 4000),
                         448.0 * 2.0 ** np.arange(-30, 30),
                         448.0 * 2.0 ** np.arange(-30, 30) * (1 + 2 ** -20),
                         [0.0]]).astype(np.float32)
  # exponent range: the dtype's normals (finfo minexp .. maxexp - 1)
  for dtype, lo, hi in ((jnp.float32, -126, 127), (jnp.bfloat16, -126, 127),
                        (jnp.float16, -14, 15)):
    got = np.asarray(fp8_quant.pow2_scale(jnp.asarray(amax), dtype),
                     np.float64)
    for a, s in zip(amax.astype(np.float64), got):
      if a == 0:
        assert s == 1.0
        continue
      e = lo
      while e < hi and math.ldexp(1.0, e) * 448.0 < a:   # exact doubles
        e += 1
      assert s == math.ldexp(1.0, e), (dtype, a, s, e)
