"""Quantized latent cache in the model: Hadamard fold, packed decode."""


import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax import compress as C
from palu_jax.model import from_params
from compress_tests.test_compress import tiny  # noqa: F401  (fixture)
from model_tests.test_model import assert_incremental_matches_full

TOKENS = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 24)))


def _model(tiny, **fields):
  model, base, stats, _ = tiny
  comp = C.CompressionConfig(**{"ratio": 0.5, "multiple": 4,
                                "quant_group": 8, **fields})
  params, palu, report = C.compress_params(model.cfg, base, stats, comp)
  return from_params(model.cfg, params, dtype=jnp.float32, palu=palu), report


@pytest.mark.parametrize("shared", [True, False])
def test_hadamard_fold_leaves_the_model_unchanged(tiny, shared):
  plain, _ = _model(tiny, shared_kv=shared)
  rotated, _ = _model(tiny, shared_kv=shared, hadamard=True)
  np.testing.assert_allclose(rotated(TOKENS)[0], plain(TOKENS)[0], atol=1e-4,
                             rtol=1e-4)
  assert not np.allclose(rotated.layers[0].attn.k_down[...],
                         plain.layers[0].attn.k_down[...])


def test_16_bits_is_the_unquantized_model(tiny):
  a, _ = _model(tiny)
  b, _ = _model(tiny, kv_bits=16, quant_group=4)
  np.testing.assert_array_equal(a(TOKENS)[0], b(TOKENS)[0])


@pytest.mark.parametrize("bits,group", [(8, 8), (8, 0), (4, 8), (3, 8),
                                        (2, 8)])
@pytest.mark.parametrize("shared", [True, False])
def test_packed_decode_equals_fake_quant_forward(tiny, bits, group, shared):
  """Prefill + decode through the packed cache give the logits of the
  full forward with fake-quantized latents (same dequantized values);
  group 0: one scale per token and latent group."""
  model, report = _model(tiny, shared_kv=shared, hadamard=True, kv_bits=bits,
                         quant_group=group)
  cache = model.init_cache(3, 16)
  assert cache.nbytes() == 3 * 16 * report["kv_bytes_per_token"]
  # Logits of this random model reach ~60, so f32 summation order alone
  # moves them by ~1e-5; a flipped code would move them by far more than
  # 1e-6 relative.
  assert_incremental_matches_full(model, 97, rtol=1e-6)
  dense, _ = _model(tiny, shared_kv=shared, hadamard=True)
  diff = float(jnp.max(jnp.abs(model(TOKENS)[0] - dense(TOKENS)[0])))
  assert diff > 1e-4  # quantization really happened
