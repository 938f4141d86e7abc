"""M/G/J-LRD group decomposition."""

import numpy as np
import pytest

from palu_jax.decompose import lrd, svd
from palu_jax.errors import ConfigError
from decompose_tests.test_svd import correlated_inputs

K, H, D = 4, 8, 48


@pytest.fixture
def problem():
  x = correlated_inputs(d=D, seed=7)
  w = np.random.default_rng(8).standard_normal((D, K * H)).astype(np.float32)
  return x, w, x.T.astype(np.float64) @ x


@pytest.mark.parametrize("mode,g", [("mlrd", 1), ("glrd", 2), ("jlrd", 4)])
def test_full_rank_groups_reconstruct(problem, mode, g):
  _, w, gram = problem
  size = lrd.resolve_group_size(mode, K, g)
  parts = lrd.decompose_projection(w, [size * H] * (K // size), n_kv_heads=K,
                                   head_dim=H, group_size=size, gram=gram)
  np.testing.assert_allclose(lrd.reconstruct(parts), w, rtol=1e-3, atol=1e-3)
  assert all(p.down.shape == (D, size * H) for p in parts)


def test_joint_is_never_worse_than_grouped_at_equal_total_rank(problem):
  """J-LRD's rank-R solution is optimal over all rank-R maps, which include
  the block-structured ones of G- and M-LRD."""
  x, w, gram = problem
  errors = {}
  for mode, size in (("mlrd", 1), ("glrd", 2), ("jlrd", 4)):
    groups = K // size
    parts = lrd.decompose_projection(w, [16 // groups] * groups, n_kv_heads=K,
                                     head_dim=H, group_size=size, gram=gram)
    approx = lrd.reconstruct(parts).astype(np.float64)
    errors[mode] = float(np.sum((x @ (w - approx)) ** 2))
  assert errors["jlrd"] <= errors["glrd"] * (1 + 1e-4)
  assert errors["glrd"] <= errors["mlrd"] * (1 + 1e-4)


def test_m_lrd_equals_per_head_svd(problem):
  _, w, gram = problem
  parts = lrd.decompose_projection(w, [3] * K, n_kv_heads=K, head_dim=H,
                                   group_size=1, gram=gram)
  for h, p in enumerate(parts):
    one = svd.whitened_svd(w[:, h * H:(h + 1) * H], gram, 3)
    np.testing.assert_allclose(np.asarray(p.down) @ np.asarray(p.up),
                               np.asarray(one.down) @ np.asarray(one.up),
                               atol=1e-5)


def test_bad_groups(problem):
  _, w, _ = problem
  with pytest.raises(ConfigError, match="group_size"):
    lrd.resolve_group_size("glrd", K, 3)
  with pytest.raises(ConfigError, match="ranks"):
    lrd.decompose_projection(w, [4, 4], n_kv_heads=K, head_dim=H, group_size=1)
  with pytest.raises(ValueError):
    lrd.resolve_group_size("slrd", K, 1)
