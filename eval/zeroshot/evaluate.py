"""One zero-shot task on one model: load, score every choice, summarize."""

from __future__ import annotations

from eval.zeroshot.metrics import summarize
from eval.zeroshot.scoring import score_requests
from eval.zeroshot.tasks import TASKS, load_task


def evaluate_task(model, tokenizer, name: str, *, limit: int | None = None,
                  batch_size: int = 16, data_dir: str | None = None,
                  progress: bool = True, mesh=None) -> dict:
  """{n, acc, acc_norm (+ stderrs), metric, value} of task `name`; `value`
  is the task's headline metric (acc_norm, or acc where lm-eval's
  leaderboards report acc: ARC-Easy, WinoGrande)."""
  items = load_task(name, data_dir_override=data_dir, limit=limit)
  flat = [r for item in items for r in item.requests]
  scores = score_requests(model, tokenizer, flat, batch_size=batch_size,
                          progress=progress, desc=name, mesh=mesh)
  grouped, k = [], 0
  for item in items:
    grouped.append(scores[k:k + len(item.requests)])
    k += len(item.requests)
  out = summarize(items, grouped)
  metric = TASKS[name][2]
  return {**out, "metric": metric, "value": out[metric]}
