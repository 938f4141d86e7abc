"""Attention-aware output metrics against direct computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.decompose import metrics
from palu_jax.model.layers import apply_rope, rope_cos_sin, rope_inv_freq
from model_tests.test_model import make_model


@pytest.mark.parametrize("variant", ["gqa_tied", "llama3_scaling"])
def test_rope_rotation_matrices_match_apply_rope(variant):
  cfg = make_model(variant)[0].cfg
  dist = np.array([0, 1, 5, 37, 100])
  rot = metrics.rope_rotations(cfg, dist)
  k = np.random.default_rng(0).standard_normal((1, len(dist), 1, cfg.head_dim))
  cos, sin = rope_cos_sin(jnp.asarray(dist)[None], rope_inv_freq(cfg))
  want = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), cos, sin))[0, :, 0]
  got = np.einsum("thg,tg->th", rot, k[0, :, 0])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_key_metric_predicts_score_errors():
  """δkᵀ·M·δk equals the mean squared score error Σ_heads (q_i·R·δk)² over
  queries and the (T − Δ)-weighted distances it averages."""
  model = make_model("gqa_tied")[0]
  cfg = model.cfg
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, cfg.dim))
  gram = x.T @ x / len(x)
  w_q = rng.standard_normal((cfg.dim, cfg.n_heads * cfg.head_dim))
  seqlen, kv = 12, 1
  m = metrics.key_metric(w_q, gram, cfg, kv, seqlen, samples=seqlen)
  dk = rng.standard_normal(cfg.head_dim)
  q = (x @ w_q).reshape(len(x), cfg.n_heads, cfg.head_dim)
  heads = range(kv * cfg.q_per_kv, (kv + 1) * cfg.q_per_kv)
  dist = np.arange(seqlen)
  weights = (seqlen - dist) / np.sum(seqlen - dist)
  rot = metrics.rope_rotations(cfg, -dist)
  want = sum(wt * np.mean((q[:, n] @ (r @ dk)) ** 2)
             for wt, r in zip(weights, rot) for n in heads)
  assert dk @ m @ dk == pytest.approx(want, rel=1e-9)


def test_value_metric_is_output_error():
  model = make_model("gqa_tied")[0]
  cfg = model.cfg
  rng = np.random.default_rng(2)
  w_o = rng.standard_normal((cfg.n_heads * cfg.head_dim, cfg.dim))
  dv = rng.standard_normal(cfg.head_dim)
  m = metrics.value_metric(w_o, cfg, 0)
  rows = w_o.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)
  want = sum(np.sum((dv @ rows[n]) ** 2) for n in range(cfg.q_per_kv))
  assert dv @ m @ dv == pytest.approx(want, rel=1e-9)
  f = metrics.group_factor([m, m])
  np.testing.assert_allclose((f @ f.T)[:cfg.head_dim, :cfg.head_dim], m,
                             rtol=1e-5, atol=1e-6 * np.trace(m))
  assert np.all(np.triu(f, 1) == 0)
