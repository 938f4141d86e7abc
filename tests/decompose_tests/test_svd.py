"""Plain vs whitened SVD on correlated synthetic activations."""

import numpy as np
import pytest

from palu_jax.decompose import svd
from palu_jax.errors import ConfigError, PaluError


def correlated_inputs(n=2048, d=48, seed=0):
  """Activations with a few dominant, correlated directions (like LLM
  hidden states), so the input distribution is far from isotropic."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) * np.logspace(0, -2, d)[None, :]
  x = rng.standard_normal((n, d)) @ mix.T
  x[:, :3] *= 20.0  # outlier channels
  return x.astype(np.float32)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_beats_plain_on_activation_error(rank):
  x = correlated_inputs()
  w = np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32)
  gram = x.T.astype(np.float64) @ x
  plain = svd.activation_error(x, w, svd.plain_svd(w, rank))
  white = svd.activation_error(x, w, svd.whitened_svd(w, gram, rank))
  assert white < 0.9 * plain


@pytest.mark.parametrize("rank", [1, 8, 20])
def test_truncation_error_equals_discarded_singular_values(rank):
  x = correlated_inputs(seed=2)
  w = np.random.default_rng(3).standard_normal((48, 24)).astype(np.float32)
  gram = x.T.astype(np.float64) @ x
  lr = svd.whitened_svd(w, gram, rank)
  discarded = float(np.sum(np.asarray(lr.singular, np.float64)[rank:] ** 2))
  err = svd.activation_error(x, w, lr)
  assert err == pytest.approx(discarded, rel=2e-3)
  p = svd.plain_svd(w, rank)
  plain_err = float(np.sum((w.astype(np.float64) - np.asarray(p.down, np.float64)
                            @ np.asarray(p.up, np.float64)) ** 2))
  assert plain_err == pytest.approx(
      float(np.sum(np.asarray(p.singular, np.float64)[rank:] ** 2)), rel=2e-3)


def test_full_rank_reproduces_the_matrix():
  x = correlated_inputs(seed=4)
  w = np.random.default_rng(5).standard_normal((48, 16)).astype(np.float32)
  lr = svd.whitened_svd(w, x.T.astype(np.float64) @ x, 16)
  np.testing.assert_allclose(np.asarray(lr.down) @ np.asarray(lr.up), w,
                             rtol=1e-3, atol=1e-3)
  assert lr.down.shape == (48, 16) and lr.up.shape == (16, 16)


def test_singular_gram_gets_jitter_with_warning(caplog):
  x = correlated_inputs(n=16, seed=6)  # 16 tokens < 48 dims: rank deficient
  gram = x.T.astype(np.float64) @ x
  s, lam = svd.whitening_factor(gram)
  assert lam > 0 and np.all(np.isfinite(np.asarray(s)))
  assert "not positive definite" in caplog.text


def test_bad_inputs():
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ConfigError, match="rank"):
    svd.plain_svd(w, 5)
  with pytest.raises(ConfigError, match="rank"):
    svd.plain_svd(w, 0)
  gram = np.eye(8)
  gram[0, 0] = np.nan
  with pytest.raises(PaluError, match="NaN"):
    svd.whitened_svd(w, gram, 2)


@pytest.mark.parametrize("rank", [2, 9])
def test_output_metric_error_equals_discarded_singular_values(rank):
  """With an output metric M, the truncation error ‖X·(W − W')·M‖² equals
  the discarded σ² of Sᵀ·W·M, and W' is the best in that metric (beats the
  input-only whitened solution there)."""
  x = correlated_inputs(seed=9)
  rng = np.random.default_rng(10)
  w = rng.standard_normal((48, 16)).astype(np.float32)
  m = np.tril(rng.standard_normal((16, 16))) + 4 * np.eye(16)
  gram = x.T.astype(np.float64) @ x
  f = svd.factorize(w, gram, out_factor=m)
  lr = f.truncate(rank)
  x64 = x.astype(np.float64)

  def weighted_error(low):
    approx = np.asarray(low.down, np.float64) @ np.asarray(low.up, np.float64)
    return float(np.sum((x64 @ (w - approx) @ m) ** 2))
  assert weighted_error(lr) == pytest.approx(f.discarded(rank), rel=5e-3)
  assert weighted_error(lr) < weighted_error(svd.whitened_svd(w, gram, rank))
  np.testing.assert_allclose(np.asarray(f.truncate(16).down)
                             @ np.asarray(f.truncate(16).up), w, atol=2e-3)
