"""Gram accumulation of the k/v projection inputs."""

import numpy as np
import pytest

from model_tests.test_model import make_model
from palu_jax.calibrate.activations import kv_input_grams
from palu_jax.errors import PaluError


def test_layer0_gram_matches_numpy_and_batching_does_not_matter():
  model, w, hf = make_model("gqa_tied")
  rng = np.random.default_rng(0)
  windows = rng.integers(0, hf["vocab_size"], (5, 12))
  grams, n = kv_input_grams(model, windows, batch_size=2, progress=False)
  assert grams.shape == (2, 64, 64) and n == 60
  # Layer 0's input is RMSNorm(embedding) (NumPy, float64, from HF weights).
  x = w["model.embed_tokens.weight"][windows.reshape(-1)].astype(np.float64)
  h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) \
      * w["model.layers.0.input_layernorm.weight"]
  np.testing.assert_allclose(grams[0], h.T @ h, rtol=1e-4, atol=1e-3)
  one_by_one, _ = kv_input_grams(model, windows, batch_size=1, progress=False)
  np.testing.assert_allclose(grams, one_by_one, rtol=1e-5, atol=1e-3)
  for g in grams:  # symmetric positive semi-definite
    np.testing.assert_allclose(g, g.T, atol=1e-6 * np.abs(g).max())
    assert np.linalg.eigvalsh(g).min() > -1e-6 * np.abs(g).max()


def test_bad_windows():
  model, _, _ = make_model("mha")
  with pytest.raises(PaluError, match="non-empty"):
    kv_input_grams(model, np.zeros((0, 8), np.int32), progress=False)
