"""Rank allocation across modules: uniform, or proportional to Fisher scores.

Palu's reference code allocates rank_m = floor(R · F_m / ΣF), which can miss
the target; here the total is exact. Ranks are multiples of `multiple`
(kernel-friendly), capped at each module's full dimension, with the surplus
from capped modules redistributed to the others.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from palu_jax.errors import ConfigError


def target_total(full_dims: Sequence[int], keep_ratio: float, multiple: int) -> int:
  """Σ ranks for keeping `keep_ratio` of Σ full dims, as a multiple of
  `multiple` (rounded to the nearest achievable)."""
  if not 0 < keep_ratio <= 1:
    raise ConfigError("ratio", f"kept fraction must be in (0, 1], got "
                      f"{keep_ratio}")
  units = round(sum(full_dims) * keep_ratio / multiple)
  return max(units, len(full_dims)) * multiple


def _validate(full_dims, total, multiple):
  if multiple < 1:
    raise ConfigError("multiple", f"must be >= 1, got {multiple}")
  for i, d in enumerate(full_dims):
    if d % multiple:
      raise ConfigError("multiple", f"module {i} has full dim {d}, not a "
                        f"multiple of {multiple}")
  if total % multiple:
    raise ConfigError("total", f"{total} is not a multiple of {multiple}")
  lo, hi = len(full_dims) * multiple, sum(full_dims)
  if not lo <= total <= hi:
    raise ConfigError("total", f"{total} is impossible: each of "
                      f"{len(full_dims)} modules needs >= {multiple} and at "
                      f"most its full dim (sum {hi})")


def allocate(scores: Sequence[float], full_dims: Sequence[int], total: int,
             *, multiple: int = 1) -> list[int]:
  """Ranks ∝ scores with caps, each a positive multiple of `multiple`.

  Args:
    scores: non-negative importance per module (Fisher information).
    full_dims: the largest rank each module can take.
    total: required Σ ranks (exactly met).

  Returns:
    ranks, deterministic for equal inputs.
  """
  scores = np.asarray(scores, np.float64)
  if scores.shape != (len(full_dims),):
    raise ConfigError("scores", f"{scores.shape} scores for {len(full_dims)} "
                      "modules")
  if not np.all(np.isfinite(scores)) or np.any(scores < 0):
    raise ConfigError("scores", "must be finite and non-negative")
  _validate(full_dims, total, multiple)
  caps = np.asarray(full_dims) // multiple
  units = total // multiple
  n = len(caps)
  # Water-filling: alloc_i(λ) = clip(λ·score_i, 1, cap_i) rises
  # monotonically with λ; bisect for Σ alloc = units. Modules pinned at a cap
  # thereby hand their surplus to the others, and every module keeps >= 1.
  top = scores.max()
  # Scores below 1e-12 of the largest count as zero (keeps λ finite).
  weights = (np.where(scores > 1e-12 * top, scores / top, 0.0) if top > 0
             else np.ones(n))
  def fill(lam):
    return np.clip(lam * weights, 1.0, caps)
  lo, hi = 0.0, float(caps.max() / weights[weights > 0].min()) + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if fill(mid).sum() < units else (lo, mid)
  alloc = fill(hi)
  # Round down, then hand the leftover units out by largest remainder
  # (ties to the lower index), never above a cap.
  ranks = np.floor(alloc + 1e-9).astype(np.int64)
  left = units - int(ranks.sum())
  if left < 0:
    raise AssertionError(f"rank allocation overshot by {-left} units")
  order = sorted(range(n), key=lambda i: (-(alloc[i] - ranks[i]), i))
  while left > 0:
    progressed = False
    for i in order:
      if left and ranks[i] < caps[i]:
        ranks[i] += 1
        left -= 1
        progressed = True
    if not progressed:
      raise AssertionError("unreachable: total was validated against caps")
  return [int(r) * multiple for r in ranks]


def uniform(full_dims: Sequence[int], total: int, *, multiple: int = 1) -> list[int]:
  """Ranks ∝ full dims (the same kept fraction everywhere), exact total."""
  return allocate([float(d) for d in full_dims], full_dims, total,
                  multiple=multiple)
