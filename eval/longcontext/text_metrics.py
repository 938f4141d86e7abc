"""Answer metrics as LongBench defines them: token F1 of normalized
answers (SQuAD normalization), ROUGE-L F-measure, and classification
accuracy. Each score is the best over the gold answers."""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, drop punctuation and English articles, squeeze spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
  """F1 of the bags of normalized words."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(
      gold).split()
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
  """ROUGE-L F-measure (β = 1) over lower-cased whitespace tokens."""
  pred, ref = prediction.lower().split(), gold.lower().split()
  if not pred or not ref:
    return 0.0
  lcs = _lcs(pred, ref)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, gold: str,
                         all_classes: list[str]) -> float:
  """1 / (classes named) if the gold class is among the classes named in
  the prediction, else 0 (LongBench's rule for TREC-style tasks)."""
  named = [c for c in all_classes if c in prediction]
  # a class name inside the gold one (e.g. "location" in "other location")
  # does not count on its own
  named = [c for c in named if not (c in gold and c != gold)]
  return 1.0 / len(named) if gold in named else 0.0


def best_over_answers(metric, prediction: str, answers: list[str],
                      **kw) -> float:
  return max((metric(prediction, a, **kw) for a in answers), default=0.0)
