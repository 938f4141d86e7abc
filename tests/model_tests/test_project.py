"""`layers.project`: one-row products stay matrix products (see its doc)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.model.layers import _GEMV_PAD_ELEMENTS, project


@pytest.mark.parametrize("lead,k,n", [((1, 1), 1024, 1024),   # padded
                                      ((3, 2), 1024, 1024),   # 6 rows
                                      ((1,), 64, 48)])        # small weight
def test_project_equals_matmul(lead, k, n):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (*lead, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32)
  got = project(x, w)
  assert got.shape == (*lead, n) and got.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-3)


def test_project_out_dtype():
  x = jnp.ones((1, 1, 1024), jnp.bfloat16)
  w = jnp.ones((1024, 1024), jnp.bfloat16)
  y = project(x, w, out_dtype=jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), 1024.0)


def test_one_row_with_large_weight_is_a_two_row_dot():
  """What XLA sees: a [2, K] operand behind an optimization barrier (so no
  simplification turns the product back into a vector-matrix one); a small
  weight or several rows are left alone."""
  def text(rows, k, n):
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    return jax.jit(project).lower(x, w).as_text()
  k = 1024
  n = _GEMV_PAD_ELEMENTS // k
  padded = text(1, k, n)
  assert "optimization_barrier" in padded
  assert f"tensor<2x{k}xbf16>" in padded
  assert "optimization_barrier" not in text(1, k, n // 2)
  assert "optimization_barrier" not in text(4, k, n)
