"""Rank allocation: exact totals, caps, multiples, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from palu_jax.decompose import ranks
from palu_jax.errors import ConfigError


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_allocation_invariants(data):
  multiple = data.draw(st.sampled_from([1, 8, 32]))
  n = data.draw(st.integers(1, 12))
  full = [multiple * data.draw(st.integers(1, 16)) for _ in range(n)]
  scores = [data.draw(st.floats(0, 1e3, allow_nan=False)) for _ in range(n)]
  units = data.draw(st.integers(n, sum(full) // multiple))
  total = units * multiple
  got = ranks.allocate(scores, full, total, multiple=multiple)
  assert sum(got) == total
  assert all(r % multiple == 0 and multiple <= r <= f for r, f in zip(got, full))
  assert got == ranks.allocate(scores, full, total, multiple=multiple)


def test_proportional_when_no_cap_binds():
  got = ranks.allocate([1.0, 2.0, 5.0], [800, 800, 800], 800, multiple=1)
  assert got == [100, 200, 500]


def test_capped_surplus_is_redistributed():
  # Module 2 wants 3/4 of 512 = 384 but is capped at 128: the rest is split
  # 1:1 between the others.
  got = ranks.allocate([1.0, 1.0, 6.0], [512, 512, 128], 512, multiple=32)
  assert got == [192, 192, 128]


def test_higher_score_never_gets_less_with_equal_caps():
  rng = np.random.default_rng(0)
  scores = rng.random(20)
  got = ranks.allocate(scores, [256] * 20, 2048, multiple=16)
  order = np.argsort(scores)
  assert all(got[order[i]] <= got[order[i + 1]] for i in range(19))


def test_uniform_keeps_the_same_fraction():
  assert ranks.uniform([64, 128, 256], 224, multiple=32) == [32, 64, 128]
  total = ranks.target_total([192] * 30, 0.5, 32)
  assert total == 2880 and ranks.uniform([192] * 30, total, multiple=32) == [96] * 30


def test_impossible_requests_are_named():
  with pytest.raises(ConfigError, match="impossible"):
    ranks.allocate([1, 1], [64, 64], 192, multiple=32)
  with pytest.raises(ConfigError, match="multiple"):
    ranks.allocate([1, 1], [64, 60], 64, multiple=32)
  with pytest.raises(ConfigError, match="not a multiple"):
    ranks.allocate([1, 1], [64, 64], 48, multiple=32)
  with pytest.raises(ConfigError, match="ratio"):
    ranks.target_total([64], 1.5, 32)
  with pytest.raises(ConfigError, match="non-negative"):
    ranks.allocate([1, -1], [64, 64], 64, multiple=32)


def _brute_force(spectra, full, total, multiple, weights):
  import itertools
  best = None
  options = [range(multiple, f + 1, multiple) for f in full]
  for combo in itertools.product(*options):
    if sum(combo) != total:
      continue
    cost = sum(w * float(np.sum(np.square(s[r:])))
               for s, r, w in zip(spectra, combo, weights))
    if best is None or cost < best[0] - 1e-12:
      best = (cost, list(combo))
  return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_error_allocation_is_optimal_and_exact(data):
  """Greedy on sorted spectra = brute-force minimum of Σ w·discarded σ²."""
  multiple = data.draw(st.sampled_from([1, 2, 4]))
  n = data.draw(st.integers(1, 4))
  full = [multiple * data.draw(st.integers(1, 4)) for _ in range(n)]
  spectra = [np.sort(np.asarray(data.draw(st.lists(
      st.floats(0, 10, allow_nan=False), min_size=f, max_size=f))))[::-1]
      for f in full]
  weights = [data.draw(st.floats(0.01, 5)) for _ in range(n)]
  total = multiple * data.draw(st.integers(n, sum(full) // multiple))
  got = ranks.allocate_by_error(spectra, full, total, multiple=multiple,
                                weights=weights)
  assert sum(got) == total
  assert all(r % multiple == 0 and multiple <= r <= f for r, f in zip(got, full))
  cost = sum(w * float(np.sum(np.square(s[r:])))
             for s, r, w in zip(spectra, got, weights))
  best_cost, _ = _brute_force(spectra, full, total, multiple, weights)
  assert cost <= best_cost + 1e-9 * (1 + best_cost)
  assert got == ranks.allocate_by_error(spectra, full, total,
                                        multiple=multiple, weights=weights)


def test_error_allocation_bad_input():
  with pytest.raises(ConfigError, match="spectra"):
    ranks.allocate_by_error([np.ones(4)], [4, 4], 4)
  with pytest.raises(ConfigError, match="spectra"):
    ranks.allocate_by_error([np.array([1.0, np.nan, 0, 0])], [4], 4)
  with pytest.raises(ConfigError, match="weights"):
    ranks.allocate_by_error([np.ones(4)], [4], 4, weights=[-1.0])


def test_unreachable_ratio_is_refused_not_rounded():
  """8-wide modules in multiples of 4 keep at least half: 30 % is refused."""
  with pytest.raises(ConfigError, match="minimum 50.0%"):
    ranks.target_total([8] * 10, 0.3, 4)
  assert ranks.target_total([8] * 10, 0.5, 4) == 40
