"""acc and acc_norm of multiple-choice items from continuation scores."""

from __future__ import annotations

import math

import numpy as np

from eval.zeroshot.scoring import Score
from eval.zeroshot.tasks import Item


def choice_accuracies(item: Item, scores: list[Score]) -> tuple[float, float]:
  """(acc, acc_norm) of one item: the argmax of the summed log-likelihood,
  and of the log-likelihood per character of the choice (lm-eval's
  length normalization). Ties go to the first choice, as numpy's argmax."""
  ll = np.array([s.logprob for s in scores])
  norm = ll / np.array(item.choice_lengths, dtype=np.float64)
  return (float(np.argmax(ll) == item.label),
          float(np.argmax(norm) == item.label))


def summarize(items: list[Item], scores: list[list[Score]]) -> dict:
  """acc, acc_norm and their standard errors over items."""
  per_item = np.array([choice_accuracies(i, s) for i, s in
                       zip(items, scores)], dtype=np.float64)
  n = len(per_item)
  out = {"n": n}
  for k, name in enumerate(("acc", "acc_norm")):
    col = per_item[:, k]
    out[name] = float(col.mean())
    out[name + "_stderr"] = (float(col.std(ddof=1) / math.sqrt(n))
                             if n > 1 else None)
  return out
