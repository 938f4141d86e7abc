"""Side-by-side evaluation of several model configurations, resumable.

  palu-jax eval --models base=DIR palu50=DIR2 kivi2=DIR@kivi2 \\
      --tasks ppl,zeroshot,needle [--limit N] [--name NAME]

Every (model, task) pair is one unit of work whose result is written
atomically to <out>/<name>/parts/<model>/<task>.json together with the
settings it was computed with. A rerun skips the parts whose settings
match, so an interrupted run resumes where it stopped and finishes with
the same numbers. After each part, results.json (every number), results.md
(the tables) and PNG plots are rewritten.

A model is NAME=DIR, with an optional @KV suffix for a simulated
quantized-KV baseline on a dense model: kivi2, kivi4 (KIVI, 32-token key
groups, 128 recent tokens in full precision) or rtn4, rtn3, rtn2 (per-token
round-to-nearest, groups of 32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time

from eval.report import markdown_table, write_results
from palu_jax.checkpoint import atomic_write_text
from palu_jax.errors import ConfigError
from palu_jax.fields import (check_field_types, check_positive,
                             require_positive_int)

log = logging.getLogger(__name__)

ZEROSHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
            "openbookqa")
PPL_DATASETS = ("wikitext2", "c4")
TASK_GROUPS = ("ppl", "zeroshot", "needle", "longbench")
_KV_RE = re.compile(r"^(kivi|rtn)([234])$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  path: str
  kv: str | None = None      # simulated quantized-KV baseline, e.g. kivi2

  @classmethod
  def parse(cls, text: str) -> "ModelSpec":
    if "=" not in text:
      raise ConfigError("--models", f"{text!r} is not NAME=DIR[@KV]")
    name, rest = text.split("=", 1)
    path, _, kv = rest.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
      raise ConfigError("--models", f"model name {name!r}: use letters, "
                        "digits and _.+- only (it names a directory)")
    if kv and not _KV_RE.match(kv):
      raise ConfigError("--models", f"{text}: unknown KV baseline {kv!r} "
                        "(kivi2, kivi4, rtn4, rtn3, rtn2)")
    if not os.path.exists(path):
      raise ConfigError("--models", f"{path}: no such model directory")
    return cls(name, os.path.abspath(path), kv or None)

  def kv_quant(self) -> tuple | None:
    """(method, bits, group, residual) for the model's attention layers."""
    if self.kv is None:
      return None
    method, bits = _KV_RE.match(self.kv).groups()
    return (method, int(bits), 32, 128 if method == "kivi" else 0)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  tasks: tuple[str, ...] = ("ppl", "zeroshot", "needle")
  limit: int | None = None          # zero-shot items per task
  ppl_seqlen: int = 2048
  ppl_limit: int | None = None      # windows per corpus
  needle_lengths: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
  needle_samples: int = 2
  longbench_limit: int | None = None
  batch_size: int = 16
  dtype: str = "float32"
  data_dir: str | None = None

  def __post_init__(self):
    check_field_types(self)
    check_positive(self, ("limit", "ppl_seqlen", "ppl_limit",
                          "needle_samples", "longbench_limit", "batch_size"))
    for n in self.needle_lengths:
      require_positive_int("needle_lengths", n)


def expand_tasks(groups: tuple[str, ...], data_dir: str | None) -> list[str]:
  """Task groups -> unit task names (ppl:wikitext2, zeroshot:piqa, ...)."""
  from eval.longcontext.longbench import available_tasks
  out = []
  for g in groups:
    if g not in TASK_GROUPS:
      raise ConfigError("--tasks", f"unknown task {g!r} (known: "
                        f"{', '.join(TASK_GROUPS)})")
    if g == "ppl":
      out += [f"ppl:{d}" for d in PPL_DATASETS]
    elif g == "zeroshot":
      out += [f"zeroshot:{t}" for t in ZEROSHOT]
    elif g == "needle":
      out.append("needle")
    else:
      found = available_tasks(data_dir)
      if not found:
        log.warning("longbench: no task files under <data>/longbench; "
                    "skipped")
      out += [f"longbench:{t}" for t in found]
  return out


def task_settings(task: str, cfg: SuiteConfig) -> dict:
  """The settings a task's numbers depend on (a resumed part must match)."""
  base = {"dtype": cfg.dtype}
  if task.startswith("ppl:"):
    return {**base, "seqlen": cfg.ppl_seqlen, "limit": cfg.ppl_limit}
  if task.startswith("zeroshot:"):
    return {**base, "limit": cfg.limit}
  if task == "needle":
    return {**base, "lengths": list(cfg.needle_lengths),
            "samples": cfg.needle_samples}
  return {**base, "limit": cfg.longbench_limit}


# --------------------------------------------------------------- one model

def load_for_eval(spec: ModelSpec, dtype: str):
  """(model, tokenizer, info) with info = {kv_bytes_per_token, kind}."""
  from palu_jax.api import load_model
  from palu_jax.kv_report import kv_bytes_per_token
  from palu_jax.quantize.kv_baselines import bytes_per_token
  model, tok = load_model(spec.path, dtype=dtype)
  cfg, palu = model.cfg, model.palu
  if tok is None:
    raise ConfigError("--models", f"{spec.path}: no tokenizer next to the "
                      "checkpoint")
  kvq = spec.kv_quant()
  if kvq is not None:
    if palu is not None:
      raise ConfigError("--models", f"{spec.name}: @{spec.kv} simulates a "
                        "quantized full KV cache; use it on a dense model")
    for layer in model.layers:
      layer.attn.kv_quant = kvq
    method, bits, group, residual = kvq
    nbytes = bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim,
                             method=method, bits=bits, group=group,
                             residual=residual, context=2048)
  else:
    nbytes = kv_bytes_per_token(cfg, palu)
  info = {"path": spec.path, "kv": spec.kv,
          "kind": "palu" if palu else "dense",
          "kv_bytes_per_token": round(float(nbytes), 1),
          "max_seq_len": cfg.max_seq_len}
  return model, tok, info


def run_task(task: str, model, tok, cfg: SuiteConfig, progress: bool,
             mesh=None) -> dict:
  """One task's result; perplexity and zero-shot run data-parallel on
  `mesh` when given (the long-context tasks on one device)."""
  if task.startswith("ppl:"):
    from eval.perplexity import perplexity
    from palu_jax.data import load_text
    ids = tok.encode(load_text(task[4:], data_dir_override=cfg.data_dir),
                     add_bos=False)
    seqlen = min(cfg.ppl_seqlen, model.cfg.max_seq_len)
    r = perplexity(model, ids, seqlen=seqlen, limit=cfg.ppl_limit,
                   progress=progress, mesh=mesh)
    return {"value": r.perplexity, "metric": "perplexity", "nll": r.nll,
            "windows": r.windows, "tokens": r.tokens, "seqlen": r.seqlen}
  if task.startswith("zeroshot:"):
    from eval.zeroshot.evaluate import evaluate_task
    return evaluate_task(model, tok, task[9:], limit=cfg.limit,
                         batch_size=cfg.batch_size, data_dir=cfg.data_dir,
                         progress=progress, mesh=mesh)
  if task == "needle":
    from eval.longcontext.needle import needle_eval
    out = needle_eval(model, tok, context_lens=cfg.needle_lengths,
                      samples=cfg.needle_samples, progress=progress)
    return {**out, "value": out["accuracy"], "metric": "accuracy"}
  from eval.longcontext.longbench import evaluate_longbench
  return evaluate_longbench(model, tok, task[10:], limit=cfg.longbench_limit,
                            data_dir_override=cfg.data_dir)


# ------------------------------------------------------------------- runner

def _part_path(out_dir: str, model: str, task: str) -> str:
  return os.path.join(out_dir, "parts", model, task.replace(":", "__")
                      + ".json")


def _read_part(path: str, settings: dict, *, warn: bool = True
               ) -> dict | None:
  """The saved part, or None if absent or computed with other settings."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    part = json.load(f)
  if part.get("settings") != settings:
    if warn:  # once, where the runner decides what to compute
      log.warning("%s: computed with other settings; recomputing", path)
    return None
  return part


def run_suite(models: list[ModelSpec], cfg: SuiteConfig, out_dir: str, *,
              progress: bool = True, mesh=None) -> dict:
  """Runs every (model, task) pair not already done; returns the summary
  written to <out_dir>/results.json."""
  names = [m.name for m in models]
  if len(set(names)) != len(names):
    raise ConfigError("--models", f"model names repeat: {names}")
  tasks = expand_tasks(cfg.tasks, cfg.data_dir)
  # no directory is made before a result exists: a model that fails its
  # checks in load_for_eval must not leave an empty results folder
  info_path = os.path.join(out_dir, "parts", "models.json")
  infos = {}
  if os.path.exists(info_path):
    with open(info_path) as f:
      infos = json.load(f)
  for spec in models:
    todo = [t for t in tasks if _read_part(
        _part_path(out_dir, spec.name, t), task_settings(t, cfg)) is None]
    if not todo and spec.name in infos:
      print(f"{spec.name}: all {len(tasks)} tasks done")
      continue
    model, tok, info = load_for_eval(spec, cfg.dtype)
    infos[spec.name] = info
    os.makedirs(os.path.dirname(info_path), exist_ok=True)
    atomic_write_text(info_path, json.dumps(infos, indent=1) + "\n")
    for task in todo:
      t0 = time.perf_counter()
      result = run_task(task, model, tok, cfg, progress, mesh)
      result["seconds"] = round(time.perf_counter() - t0, 2)
      path = _part_path(out_dir, spec.name, task)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic_write_text(path, json.dumps(
          {"model": spec.name, "task": task,
           "settings": task_settings(task, cfg), "result": result},
          indent=1) + "\n")
      print(f"{spec.name} {task}: {result['metric']} "
            f"{result['value'] if result['value'] is not None else 'n/a'}"
            f" ({result['seconds']} s)", flush=True)
      write_summary(out_dir, names, tasks, infos, cfg)
    del model
  return write_summary(out_dir, names, tasks, infos, cfg)


def write_summary(out_dir: str, names: list[str], tasks: list[str],
                  infos: dict, cfg: SuiteConfig) -> dict:
  results = {}
  for name in names:
    for task in tasks:
      part = _read_part(_part_path(out_dir, name, task),
                        task_settings(task, cfg), warn=False)
      if part is not None:
        results.setdefault(name, {})[task] = part["result"]
  summary = {"models": {n: infos.get(n) for n in names}, "tasks": tasks,
             "settings": dataclasses.asdict(cfg), "results": results}
  md = render_markdown(summary)
  write_results(out_dir, "results", summary, md)
  from eval.plots import plot_suite
  plot_suite(summary, out_dir)
  return summary


def headline_rows(summary: dict) -> list[dict]:
  """One row per model: bytes per token, perplexities, zero-shot headline
  accuracies (%) and their average, needle accuracy (%)."""
  base_bytes = None
  rows = []
  for name, info in summary["models"].items():
    res = summary["results"].get(name, {})
    row = {"model": name}
    if info:
      row["kv_bytes_per_token"] = info["kv_bytes_per_token"]
      base_bytes = base_bytes or (info["kv_bytes_per_token"]
                                  if info["kind"] == "dense"
                                  and not info["kv"] else None)
    for d in PPL_DATASETS:
      if f"ppl:{d}" in res:
        row[f"ppl_{d}"] = res[f"ppl:{d}"]["value"]
    accs = []
    for t in ZEROSHOT:
      if f"zeroshot:{t}" in res:
        row[t] = 100 * res[f"zeroshot:{t}"]["value"]
        accs.append(row[t])
    if len(accs) == len(ZEROSHOT):
      row["zeroshot_avg"] = sum(accs) / len(accs)
    if "needle" in res and res["needle"]["value"] is not None:
      row["needle"] = 100 * res["needle"]["value"]
    for task, r in res.items():
      if task.startswith("longbench:"):
        row[task[10:]] = r["value"]
    rows.append(row)
  if base_bytes:
    for row in rows:
      if "kv_bytes_per_token" in row:
        row["kv_kept"] = row["kv_bytes_per_token"] / base_bytes
  return rows


def render_markdown(summary: dict) -> str:
  rows = headline_rows(summary)
  cols = ["model", "kv_bytes_per_token", "kv_kept",
          *[f"ppl_{d}" for d in PPL_DATASETS], *ZEROSHOT, "zeroshot_avg",
          "needle"]
  cols += sorted({k for r in rows for k in r} - set(cols))
  cols = [c for c in cols if any(c in r for r in rows)]
  s = summary["settings"]
  text = ["# Evaluation suite\n",
          f"Zero-shot columns are % ({', '.join(f'{t}: ' + _metric(t) for t in ZEROSHOT)}), "
          f"items per task: {s['limit'] or 'all'}; perplexity at seqlen "
          f"{s['ppl_seqlen']}, windows: {s['ppl_limit'] or 'all'}; needle: % "
          f"retrieved over lengths {s['needle_lengths']} (those within the "
          f"model's context); dtype {s['dtype']}.\n",
          markdown_table(rows, cols)]
  detail = []
  for name in summary["models"]:
    res = summary["results"].get(name, {})
    for t in ZEROSHOT:
      r = res.get(f"zeroshot:{t}")
      if r:
        detail.append({"model": name, "task": t, "n": r["n"],
                       "acc": 100 * r["acc"], "acc_norm": 100 * r["acc_norm"],
                       "acc_stderr": 100 * (r["acc_stderr"] or 0)})
  if detail:
    text += ["\n## Zero-shot, acc and acc_norm (%)\n",
             markdown_table(detail, ["model", "task", "n", "acc", "acc_norm",
                                     "acc_stderr"])]
  return "\n".join(text)


def _metric(task: str) -> str:
  from eval.zeroshot.tasks import TASKS
  return TASKS[task][2]
