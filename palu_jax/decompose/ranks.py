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
  if units < len(full_dims):
    # Every module keeps at least one multiple; never round the ratio up
    # silently.
    raise ConfigError("ratio", f"keeping {keep_ratio:.1%} is below the "
                      f"minimum {len(full_dims) * multiple / sum(full_dims):.1%}"
                      f" ({multiple} per module of {len(full_dims)}); lower "
                      "the rank multiple or the reduction")
  return units * multiple


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


def allocate_by_error(spectra: Sequence[np.ndarray], full_dims: Sequence[int],
                      total: int, *, multiple: int = 1,
                      weights: Sequence[float] | None = None) -> list[int]:
  """Ranks that minimise Σ_m weight_m · (discarded σ² of m), exactly.

  Each module keeps >= `multiple`; every further chunk of `multiple` ranks
  removes the squared singular values it covers from the module's error.
  Singular values are sorted, so chunk gains fall within a module and
  taking the largest gains globally is optimal (and a prefix per module).

  Args:
    spectra: per module, its (weighted) singular values, descending.
    weights: per-module error weight (default 1).
  """
  n = len(full_dims)
  if len(spectra) != n:
    raise ConfigError("spectra", f"{len(spectra)} spectra for {n} modules")
  _validate(full_dims, total, multiple)
  weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  if weights.shape != (n,) or not np.all(np.isfinite(weights)) or np.any(
      weights < 0):
    raise ConfigError("weights", "need one finite non-negative weight per "
                      "module")
  chunks = []  # (-gain, module, chunk index): sorted = best first, stable
  for m, (sig, dim) in enumerate(zip(spectra, full_dims)):
    energy = np.square(np.asarray(sig, np.float64))
    if energy.shape[0] < dim or not np.all(np.isfinite(energy)):
      raise ConfigError("spectra", f"module {m}: need {dim} finite singular "
                        f"values, got {energy.shape[0]}")
    for c in range(1, dim // multiple):
      gain = weights[m] * energy[c * multiple:(c + 1) * multiple].sum()
      chunks.append((-gain, m, c))
  chunks.sort()
  ranks = np.ones(n, np.int64)
  for _, m, _ in chunks[:total // multiple - n]:
    ranks[m] += 1
  return [int(r) * multiple for r in ranks]
