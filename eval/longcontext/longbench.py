"""LongBench-style tasks from local files: <data>/longbench/<task>.jsonl.

Each record has LongBench's fields: "context", "input" (the question),
"answers" (list) and, for classification, "all_classes". The prompt
(context, then the question, then "Answer:") is cut in the middle to the
token budget, as LongBench does, so the instructions at both ends survive;
the answer is greedy-decoded and scored with the task's metric. The
prompts here are short generic templates, not LongBench's per-task ones,
so absolute scores are not comparable with published tables; the
comparison between configurations is.
"""

from __future__ import annotations

import json
import os

from eval.longcontext import text_metrics
from palu_jax.data import DatasetError, data_dir

# task -> (metric, max new tokens, template)
_QA = ("qa_f1", 32,
       "Read the text and answer the question briefly.\n\n{context}\n\n"
       "Question: {input}\nAnswer:")
_SUM = ("rouge_l", 128, "Summarize the text.\n\n{context}\n\n{input}\n"
        "Summary:")
TASKS = {
    **{t: _QA for t in ("narrativeqa", "qasper", "multifieldqa_en",
                        "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    **{t: _SUM for t in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": ("classification", 16, "Classify the question.\n\n{context}\n\n"
             "{input}\nType:"),
}


def middle_truncate(ids: list[int], budget: int) -> list[int]:
  """The first and last budget/2 tokens of an over-long prompt."""
  if len(ids) <= budget:
    return list(ids)
  half = budget // 2
  return list(ids[:half]) + list(ids[len(ids) - (budget - half):])


def available_tasks(data_dir_override: str | None = None) -> list[str]:
  root = os.path.join(data_dir(data_dir_override), "longbench")
  if not os.path.isdir(root):
    return []
  return sorted(f[:-6] for f in os.listdir(root)
                if f.endswith(".jsonl") and f[:-6] in TASKS)


def load_records(task: str, data_dir_override: str | None = None,
                 limit: int | None = None) -> list[dict]:
  if task not in TASKS:
    raise DatasetError(f"unknown LongBench task {task!r} (known: "
                       f"{sorted(TASKS)})")
  path = os.path.join(data_dir(data_dir_override), "longbench",
                      task + ".jsonl")
  if not os.path.exists(path):
    raise DatasetError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]
  for i, r in enumerate(recs):
    missing = {"context", "input", "answers"} - set(r)
    if missing:
      raise DatasetError(f"{path}: record {i} lacks {sorted(missing)}")
  return recs[:limit] if limit is not None else recs


def score_prediction(task: str, prediction: str, record: dict) -> float:
  metric = TASKS[task][0]
  answers = list(record["answers"])
  if metric == "qa_f1":
    return text_metrics.best_over_answers(text_metrics.token_f1, prediction,
                                          answers)
  if metric == "rouge_l":
    return text_metrics.best_over_answers(text_metrics.rouge_l, prediction,
                                          answers)
  return text_metrics.best_over_answers(
      text_metrics.classification_score, prediction.lstrip().split("\n")[0],
      answers, all_classes=record.get("all_classes") or [])


def evaluate_longbench(model, tokenizer, task: str, *, budget: int | None = None,
                       limit: int | None = None,
                       data_dir_override: str | None = None) -> dict:
  """Mean score (0–100) of greedy answers on one task."""
  from palu_jax.generate import Generator
  metric, max_new, template = TASKS[task]
  recs = load_records(task, data_dir_override, limit)
  budget = budget or model.cfg.max_seq_len - max_new
  gen = Generator(model)
  scores = []
  for r in recs:
    ids = tokenizer.encode(template.format(context=r["context"],
                                           input=r["input"]))
    out = gen.generate_ids([middle_truncate(ids, budget)],
                           max_new_tokens=max_new)[0]
    scores.append(score_prediction(task, tokenizer.decode(out), r))
  return {"metric": metric, "n": len(scores),
          "value": 100.0 * sum(scores) / max(1, len(scores))}
