"""Rank choice by energy threshold, and Eigen Attention's per-layer search.

A threshold τ keeps the fewest leading directions whose energy (squared
singular values) holds ≥ τ of the total. Per layer, τ starts at 1.0 and
drops by `step` while the layer's attention-output relative error stays
below ε; ranks never go below the floor (a fraction of the head dim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from palu_jax.errors import ConfigError


def floor_rank(full: int, fraction: float, multiple: int = 1) -> int:
  """The smallest rank allowed: ⌈fraction·full⌉ up to a multiple, ≤ full."""
  if not 0 < fraction <= 1:
    raise ConfigError("floor", f"must be in (0, 1], got {fraction}")
  r = math.ceil(fraction * full - 1e-9)
  return min(full, math.ceil(r / multiple) * multiple)


def energy_rank(energy: Sequence[float], tau: float, *, floor: int = 1,
                multiple: int = 1) -> int:
  """Fewest leading directions holding ≥ τ of the energy, raised to `floor`
  and rounded up to `multiple` (capped at the full dim)."""
  energy = np.asarray(energy, np.float64)
  full = energy.shape[0]
  total = float(energy.sum())
  if total <= 0:
    r = 1
  else:
    cum = np.cumsum(energy) / total
    r = int(np.searchsorted(cum, tau - 1e-12)) + 1   # first cum ≥ τ
  r = max(r, floor)
  return min(full, math.ceil(r / multiple) * multiple)


def thresholds(step: float) -> list[float]:
  """τ = 1.0, 1 − step, 1 − 2·step, … > 0."""
  if not 0 < step < 1:
    raise ConfigError("step", f"must be in (0, 1), got {step}")
  return [round(1.0 - i * step, 10) for i in range(int(1 / step + 1e-9))
          if 1.0 - i * step > 1e-9]


@dataclasses.dataclass(frozen=True)
class LayerSweep:
  """One layer's ranks and measured error at each τ tried, in order."""
  taus: tuple[float, ...]
  ranks: tuple[tuple[int, int], ...]     # (key rank, value rank)
  errors: tuple[float, ...]              # attention-output relative error
  complete: bool                         # swept down to the floor

  def choose(self, eps: float) -> int:
    """Index of the τ the search stops at: the last before the first one
    (after τ = 1.0) whose error reaches ε."""
    for i in range(1, len(self.errors)):
      if self.errors[i] >= eps:
        return i - 1
    if not self.complete:
      raise ValueError("the sweep stopped early; it cannot answer larger ε")
    return len(self.errors) - 1


def sweep_layer(k_energy, v_energy, error: Callable[[int, int], float], *,
                step: float = 0.02, floor: float = 0.45, multiple: int = 1,
                eps: float | None = None) -> LayerSweep:
  """Lowers τ from 1.0, measuring `error(k_rank, v_rank)` at each new pair
  of ranks, until both sides sit at the floor (or, with `eps`, until the
  error reaches ε: enough to answer that ε, cheaper)."""
  full_k, full_v = len(k_energy), len(v_energy)
  lo_k = floor_rank(full_k, floor, multiple)
  lo_v = floor_rank(full_v, floor, multiple)
  taus, pairs, errors = [], [], []
  measured: dict[tuple[int, int], float] = {}
  for tau in thresholds(step):
    pair = (energy_rank(k_energy, tau, floor=lo_k, multiple=multiple),
            energy_rank(v_energy, tau, floor=lo_v, multiple=multiple))
    if pair not in measured:
      measured[pair] = float(error(*pair))
    taus.append(tau)
    pairs.append(pair)
    errors.append(measured[pair])
    if eps is not None and len(errors) > 1 and errors[-1] >= eps:
      return LayerSweep(tuple(taus), tuple(pairs), tuple(errors), False)
    if pair == (lo_k, lo_v):
      break
  return LayerSweep(tuple(taus), tuple(pairs), tuple(errors), True)


def budget_choice(sweeps: Sequence[LayerSweep], k_energy, v_energy,
                  total: int, *, kv_heads: int, multiple: int
                  ) -> tuple[float, list[tuple[int, int]]]:
  """Ranks meeting Σ_layers kv_heads·(r_k + r_v) == total exactly.

  The smallest ε whose per-layer choices fit the budget (choices shrink as ε
  grows), then the slack filled `multiple` ranks at a time where they add the
  most relative energy (key and value energies live in different units).

  Returns:
    (ε used, [(r_k, r_v)] per layer).
  """
  def used(choice):
    return kv_heads * sum(k + v for k, v in choice)

  candidates = sorted({e for s in sweeps for e in s.errors} | {0.0})
  candidates.append(math.inf)
  def choice_at(eps):
    return [s.ranks[s.choose(eps)] for s in sweeps]
  # Smallest feasible ε by bisection over the sorted candidates (+ a tiny
  # margin: an error equal to ε stops the search).
  lo, hi = 0, len(candidates) - 1
  if used(choice_at(math.inf)) > total:
    raise ConfigError("ratio", f"the floor ranks already take "
                      f"{used(choice_at(math.inf))} cache entries per token, "
                      f"more than the budget {total}; lower --floor or the "
                      "reduction")
  while lo < hi:
    mid = (lo + hi) // 2
    if used(choice_at(np.nextafter(candidates[mid], math.inf))) <= total:
      hi = mid
    else:
      lo = mid + 1
  eps = float(np.nextafter(candidates[lo], math.inf))
  chosen = [list(p) for p in choice_at(eps)]
  slack = total - used(chosen)
  step = kv_heads * multiple
  if slack % step:
    raise ConfigError("ratio", f"budget {total} is not reachable in steps of "
                      f"{step} entries")
  gains = []   # (-relative energy of the chunk, layer, side, chunk start)
  for i, (r_k, r_v) in enumerate(chosen):
    for side, (r, e) in enumerate(((r_k, k_energy[i]), (r_v, v_energy[i]))):
      e = np.asarray(e, np.float64)
      tot = max(float(e.sum()), 1e-30)
      for start in range(r, len(e), multiple):
        gains.append((-float(e[start:start + multiple].sum()) / tot, i, side,
                      start))
  gains.sort()
  # Chunks of one module are in decreasing-gain order, so taking the best
  # globally takes each module's chunks as a prefix.
  for _, i, side, _ in gains[:slack // step]:
    chosen[i][side] += multiple
  return eps, [tuple(c) for c in chosen]
