"""The six zero-shot tasks as lm-evaluation-harness builds them.

Each item is a list of (context, continuation) requests, one per choice, a
gold label and the length in characters of each choice (for acc_norm). The
prompts follow lm-eval's task configs:

  piqa          "Question: {goal}\\nAnswer:" + " {sol}"
  arc_easy/_challenge  "Question: {question}\\nAnswer:" + " {choice}"
  openbookqa    "{question_stem}" + " {choice}"
  hellaswag     "{activity_label}: {ctx}" + " {ending}" (cleaned text)
  winogrande    partial scoring: context = sentence up to "_" with the
                option substituted, continuation = " " + the rest; the
                continuation is the same for both options, so only acc.

Data comes from the local files described in shared/DATA.md (through
`datasets` when it is installed), else from the hub under lm-eval's names.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import logging
import os
import re

from palu_jax.data import DatasetError, data_dir

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Item:
  """One question: `requests[i]` = (context, continuation) of choice i."""
  requests: tuple[tuple[str, str], ...]
  label: int
  choice_lengths: tuple[int, ...]   # characters of each choice (acc_norm)


def _item(requests, label, choices) -> Item:
  if not 0 <= label < len(requests):
    raise DatasetError(f"label {label} out of range for {len(requests)} "
                       f"choices")
  return Item(tuple(requests), label, tuple(len(c) for c in choices))


def _choices_item(context: str, choices: list[str], label: int) -> Item:
  return _item([(context, " " + c) for c in choices], label, choices)


# ------------------------------------------------------------------ builders

def piqa_item(rec: dict, label: int) -> Item:
  return _choices_item(f"Question: {rec['goal']}\nAnswer:",
                       [rec["sol1"], rec["sol2"]], label)


def arc_item(question: str, choices: list[str], label: int) -> Item:
  return _choices_item(f"Question: {question}\nAnswer:", choices, label)


def openbookqa_item(question_stem: str, choices: list[str], label: int
                    ) -> Item:
  return _choices_item(question_stem, choices, label)


def hellaswag_clean(text: str) -> str:
  """lm-eval's HellaSwag text cleaning (a no-op on the local file, which
  was cleaned the same way)."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag_item(context: str, endings: list[str], label: int) -> Item:
  return _choices_item(hellaswag_clean(context),
                       [hellaswag_clean(e) for e in endings], label)


def winogrande_item(sentence: str, options: list[str], label: int) -> Item:
  if "_" not in sentence:
    raise DatasetError(f"WinoGrande sentence without '_': {sentence!r}")
  cut = sentence.index("_")
  rest = " " + sentence[cut + 1:].strip()
  contexts = [sentence[:cut] + o for o in options]
  return _item([(c, rest) for c in contexts], label, contexts)


# ------------------------------------------------------------- local readers

def _json_records(path: str) -> list[dict]:
  """A .json array or .jsonl file as records, through `datasets` when it
  is installed."""
  if not os.path.exists(path):
    raise DatasetError(f"{path}: no such file")
  try:
    import datasets
  except ImportError:
    with open(path, encoding="utf-8") as f:
      if path.endswith(".jsonl"):
        return [json.loads(line) for line in f if line.strip()]
      return json.load(f)
  datasets.disable_progress_bars()
  return list(datasets.load_dataset("json", data_files=path, split="train"))


def _labels(path: str) -> list[int]:
  with open(path, encoding="utf-8") as f:
    return [int(line) for line in f if line.strip()]


_ADAPTERS_RE = re.compile(r"(.*)\n\n(Answer1: .*)\n\nAnswer format: (.*)$",
                          re.S)


def parse_adapters_record(rec: dict, path: str) -> tuple[str, list[str], int]:
  """An LLM-Adapters ARC/OBQA record -> (question, choices, label)."""
  body = rec["instruction"].removeprefix(
      "Please choose the correct answer to the question: ")
  m = _ADAPTERS_RE.match(body)
  if m is None:
    raise DatasetError(f"{path}: unexpected instruction layout: "
                       f"{rec['instruction'][:80]!r}")
  parts = re.split(r"(?:^| )Answer(\d): ", m.group(2))[1:]
  numbers, choices = parts[0::2], parts[1::2]
  if numbers != [str(i + 1) for i in range(len(numbers))]:
    raise DatasetError(f"{path}: choices not numbered 1..n: {numbers}")
  label = int(rec["answer"].removeprefix("answer")) - 1
  return m.group(1), [c.strip() for c in choices], label


def _local_piqa(root):
  d = os.path.join(root, "zeroshot", "piqa")
  recs = _json_records(os.path.join(d, "valid.jsonl"))
  labels = _labels(os.path.join(d, "valid-labels.lst"))
  if len(recs) != len(labels):
    raise DatasetError(f"{d}: {len(recs)} items but {len(labels)} labels")
  return [piqa_item(r, y) for r, y in zip(recs, labels)]


def _local_adapters(root, task, build):
  path = os.path.join(root, "zeroshot", task, "test.json")
  return [build(*parse_adapters_record(r, path)) for r in _json_records(path)]


def _local_hellaswag(root):
  path = os.path.join(root, "zeroshot", "hellaswag",
                      "hellaswag_val_full.txt.bz2")
  if not os.path.exists(path):
    raise DatasetError(f"{path}: no such file")
  with bz2.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  while lines and not lines[-1]:
    lines.pop()
  if len(lines) % 6:
    raise DatasetError(f"{path}: {len(lines)} lines, not 6 per item")
  return [hellaswag_item(lines[i], lines[i + 2:i + 6], int(lines[i + 1]))
          for i in range(0, len(lines), 6)]


def _local_winogrande(root):
  path = os.path.join(root, "zeroshot", "winogrande", "dev.jsonl")
  return [winogrande_item(r["sentence"], [r["option1"], r["option2"]],
                          int(r["answer"]) - 1) for r in _json_records(path)]


# --------------------------------------------------------------- hub readers

def _hub(name, config, split):
  import datasets
  return datasets.load_dataset(name, config, split=split)


def _letter_label(key: str, labels: list[str]) -> int:
  return labels.index(key)


def _hub_piqa():
  return [piqa_item(r, int(r["label"])) for r in
          _hub("baber/piqa", None, "validation")]


def _hub_arc(config):
  return [arc_item(r["question"], r["choices"]["text"],
                   _letter_label(r["answerKey"], r["choices"]["label"]))
          for r in _hub("allenai/ai2_arc", config, "test")]


def _hub_openbookqa():
  return [openbookqa_item(r["question_stem"], r["choices"]["text"],
                          _letter_label(r["answerKey"], r["choices"]["label"]))
          for r in _hub("allenai/openbookqa", "main", "test")]


def _hub_hellaswag():
  return [hellaswag_item(f"{r['activity_label']}: {r['ctx_a']} "
                         f"{r['ctx_b'].capitalize()}", r["endings"],
                         int(r["label"]))
          for r in _hub("Rowan/hellaswag", None, "validation")]


def _hub_winogrande():
  return [winogrande_item(r["sentence"], [r["option1"], r["option2"]],
                          int(r["answer"]) - 1)
          for r in _hub("allenai/winogrande", "winogrande_xl", "validation")]


# name -> (local loader(root), hub loader(), headline metric, split size)
TASKS = {
    "piqa": (_local_piqa, _hub_piqa, "acc_norm", 1838),
    "arc_easy": (lambda r: _local_adapters(r, "arc_easy", arc_item),
                 lambda: _hub_arc("ARC-Easy"), "acc", 2376),
    "arc_challenge": (lambda r: _local_adapters(r, "arc_challenge", arc_item),
                      lambda: _hub_arc("ARC-Challenge"), "acc_norm", 1172),
    "hellaswag": (_local_hellaswag, _hub_hellaswag, "acc_norm", 10042),
    "winogrande": (_local_winogrande, _hub_winogrande, "acc", 1267),
    "openbookqa": (lambda r: _local_adapters(r, "openbookqa",
                                             openbookqa_item),
                   _hub_openbookqa, "acc_norm", 500),
}


def load_task(name: str, *, data_dir_override: str | None = None,
              limit: int | None = None) -> list[Item]:
  """The items of a task: local files first, the hub when they are absent.

  Args:
    name: one of `TASKS`.
    limit: keep only the first `limit` items.
  """
  if name not in TASKS:
    raise DatasetError(f"unknown zero-shot task {name!r} (known: "
                       f"{sorted(TASKS)})")
  local, hub, _, _ = TASKS[name]
  root = data_dir(data_dir_override)
  try:
    items = local(root)
  except DatasetError as missing:
    try:
      items = hub()
    except Exception as e:  # network and hub errors come in many types
      raise DatasetError(f"{name}: {missing}; the hub copy could not be "
                         f"loaded either ({e})") from e
    log.info("%s: local files missing, loaded from the hub", name)
  return items[:limit] if limit is not None else items
