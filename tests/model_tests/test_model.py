"""The Flax model against the NumPy reference; cache and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref
from convert.hf_safetensors import config_from_hf
from palu_jax.config import ModelConfig
from palu_jax.model import from_params
from variants import VARIANTS

# Relative error ||got - want|| / ||want|| allowed per model dtype.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _canonical(hf_weights, hf_cfg):
  """HF-named [out, in] weights -> canonical [in, out] (via the HF loader's
  key rules, so this checks the model, not the converter)."""
  from convert import keymap
  from convert.hf_safetensors import _RULES
  named = keymap.map_keys(hf_weights, _RULES, "test")
  if hf_cfg.get("tie_word_embeddings"):
    named.pop(keymap.LM_HEAD, None)
  return {k: (v.T if v.ndim == 2 and k != keymap.EMBED else v)
          for k, (_, v) in named.items()}


def make_model(variant, dtype=jnp.float32, seed=0):
  hf = VARIANTS[variant]
  w = numpy_ref.random_hf_weights(hf, seed)
  cfg = ModelConfig.from_dict(config_from_hf(hf, "test"))
  return from_params(cfg, _canonical(w, hf), dtype=dtype), w, hf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_numpy_reference(variant, dtype):
  model, w, hf = make_model(variant, dtype)
  tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], 40)
  got, _ = model(jnp.asarray(tokens)[None])
  assert got.dtype == jnp.float32  # logits are f32 under every policy
  want = numpy_ref.forward(w, hf, tokens)
  rel = np.linalg.norm(np.asarray(got[0]) - want) / np.linalg.norm(want)
  assert rel < TOLERANCE[dtype]


def test_llama3_scaling_changes_the_model():
  """Guards the scaling test above against a no-op scaling."""
  hf = VARIANTS["llama3_scaling"]
  plain = {k: v for k, v in hf.items() if k != "rope_scaling"}
  w = numpy_ref.random_hf_weights(hf)
  tokens = np.arange(60) % hf["vocab_size"]
  diff = numpy_ref.forward(w, hf, tokens) - numpy_ref.forward(w, plain, tokens)
  assert np.max(np.abs(diff)) > 1e-2


@pytest.mark.parametrize("variant", ["gqa_tied", "qwen2_bias"])
def test_incremental_decode_equals_full_forward_ragged(variant):
  model, _, hf = make_model(variant)
  assert_incremental_matches_full(model, hf["vocab_size"])


def assert_incremental_matches_full(model, vocab_size, rtol=0.0):
  """Prefill a right-padded ragged batch, then decode token by token: every
  step's logits equal the full forward of that sequence (f32: to 2e-5,
  plus `rtol` for models whose logits are large)."""
  hf = {"vocab_size": vocab_size}
  rng = np.random.default_rng(2)
  lengths = [3, 9, 6]
  total = 14
  seqs = [rng.integers(0, hf["vocab_size"], total) for _ in lengths]
  width = max(lengths)
  prompt = np.zeros((3, width), np.int32)
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    prompt[i, :n] = s[:n]
  cache = model.init_cache(3, 32)
  lens = jnp.asarray(lengths)
  logits, cache = model(jnp.asarray(prompt), cache, num_valid=lens)
  np.testing.assert_array_equal(cache.lengths, lengths)
  full = [np.asarray(model(jnp.asarray(s)[None])[0][0]) for s in seqs]
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, :n], full[i][:n], atol=2e-5,
                               rtol=rtol)
  step = jax.jit(lambda tok, c: model(tok, c))
  for k in range(total - width):
    nxt = np.array([s[n + k] for s, n in zip(seqs, lengths)])[:, None]
    logits, cache = step(jnp.asarray(nxt), cache)
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(logits[i, 0], full[i][n + k], atol=2e-5,
                                 rtol=rtol)
  np.testing.assert_array_equal(cache.lengths,
                                [n + total - width for n in lengths])


def test_logits_at_selects_positions():
  model, _, hf = make_model("mha")
  tokens = jnp.asarray(np.arange(24).reshape(2, 12) % hf["vocab_size"])
  full, _ = model(tokens)
  picked, _ = model(tokens, logits_at=jnp.asarray([3, 11]))
  np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), jnp.asarray([3, 11])],
                             atol=1e-5)


def test_bf16_policy_dtypes():
  model, _, _ = make_model("gqa_tied", jnp.bfloat16)
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  cache = model.init_cache(2, 8)
  assert cache.layers[0].k.dtype == jnp.bfloat16
  assert cache.layers[0].k.shape == (2, 8, 2, 16)  # [B, S, K, H]
