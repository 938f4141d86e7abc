"""Simulated full-KV quantization baselines (per-token RTN, KIVI)."""

import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.errors import GenerationError
from palu_jax.quantize import kv_baselines
from model_tests.test_model import make_model

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 64)))


def _set(model, spec):
  for layer in model.layers:
    layer.attn.kv_quant = spec


def test_residual_covering_everything_is_exact():
  model = make_model("gqa_tied")[0]
  want = model(TOKENS)[0]
  _set(model, ("kivi", 2, 32, 64))
  np.testing.assert_allclose(model(TOKENS)[0], want, atol=1e-5)


def test_kivi_keys_per_channel_values_per_token():
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((1, 64, 2, 16)), jnp.float32)
  kq, vq = kv_baselines.quantized_kv(k, k, method="kivi", bits=2, group=32)
  # Keys: every (channel, 32-token block) uses at most 4 distinct values.
  blocks = np.asarray(kq).reshape(1, 2, 32, 2, 16)
  assert max(len(np.unique(blocks[0, b, :, h, c])) for b in range(2)
             for h in range(2) for c in range(16)) <= 4
  # Values: every (token, head) row of 16 uses at most 4 distinct values.
  assert max(len(np.unique(np.asarray(vq)[0, s, h])) for s in range(64)
             for h in range(2)) <= 4


@pytest.mark.parametrize("method", ["rtn", "kivi"])
def test_more_bits_less_error_and_no_decoding(method):
  model = make_model("gqa_tied")[0]
  want = model(TOKENS)[0]
  err = []
  for bits in (2, 4):
    _set(model, (method, bits, 16, 0))
    err.append(float(jnp.linalg.norm(model(TOKENS)[0] - want)))
  assert err[1] < err[0] and err[1] > 0
  with pytest.raises(GenerationError, match="kv_quant"):
    model(TOKENS, model.init_cache(2, 80))


def test_bytes_per_token_accounting():
  # Llama-2-7B-like: 32 layers x 32 heads x 128; KIVI-2, group 32, residual
  # 128 at 4K context.
  got = kv_baselines.bytes_per_token(32, 32, 128, method="kivi", bits=2,
                                     group=32, residual=128, context=4096)
  per_layer = 2 * 32 * 128
  want = 32 * ((1 - 1 / 32) * (per_layer / 4 + per_layer / 32 * 4)
               + per_layer * 2 / 32)
  assert got == pytest.approx(want)
