"""Fisher scores of k/v projections from jax.grad."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_tests.test_model import make_model
from palu_jax.calibrate.fisher import _kv_grads, is_kv_kernel, kv_fisher, lm_loss


def test_fisher_matches_finite_differences():
  """F of a module from jax.grad equals the definition evaluated with
  central finite differences of the loss (float32 model, one batch)."""
  model, _, hf = make_model("gqa_tied")
  windows = np.random.default_rng(0).integers(0, hf["vocab_size"], (2, 10))
  scores = kv_fisher(model, windows, batch_size=2, progress=False)
  assert sorted(scores) == sorted(
      f"layers.{i}.attn.{m}_proj" for i in range(2) for m in ("k", "v"))
  assert all(s > 0 for s in scores.values())
  # Finite differences on a 3x3 corner of layer 1's v_proj kernel.
  kernel = model.layers[1].attn.v_proj.kernel
  base = np.asarray(kernel[...]).copy()
  eps = 1e-2
  grads = np.zeros((3, 3))
  for r in range(3):
    for c in range(3):
      vals = []
      for sign in (1, -1):
        w = base.copy()
        w[r, c] += sign * eps
        kernel[...] = jnp.asarray(w)
        vals.append(float(lm_loss(model, jnp.asarray(windows))))
      grads[r, c] = (vals[0] - vals[1]) / (2 * eps)
  kernel[...] = jnp.asarray(base)
  # The gradient behind the score, on the same corner.
  graphdef, kv, rest = nnx.split(model, is_kv_kernel, ...)
  g = _kv_grads(graphdef, kv, rest, jnp.asarray(windows))
  full = np.asarray(g["layers"][1]["attn"]["v_proj"]["kernel"][...])
  np.testing.assert_allclose(full[:3, :3], grads, rtol=5e-2, atol=5e-4)
  # One batch: F = mean over the kernel of sqrt(g²) = mean |g|.
  assert abs(scores["layers.1.attn.v_proj"] / np.mean(np.abs(full)) - 1) < 1e-5


def test_fisher_is_deterministic_and_batch_sensitive():
  model, _, hf = make_model("mha")
  windows = np.random.default_rng(1).integers(0, hf["vocab_size"], (4, 8))
  a = kv_fisher(model, windows, batch_size=2, progress=False)
  b = kv_fisher(model, windows, batch_size=2, progress=False)
  assert a == b
  c = kv_fisher(model, windows[:2], batch_size=2, progress=False)
  assert a != c
