"""Text corpora for perplexity and calibration, loaded through `datasets`.

Local files come first (offline, deterministic): the directory named by
`--data-dir` or $PALU_JAX_DATA, else `../shared/data` beside the repository,
else the copies packaged with palu_jax (WikiText-2 test only). The Hugging
Face hub is tried only when no local copy exists.
"""

from __future__ import annotations

import json
import logging
import os

from palu_jax.errors import PaluError


log = logging.getLogger(__name__)

DATA_ENV = "PALU_JAX_DATA"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_SHARED = os.path.join(os.path.dirname(_PACKAGE_DIR), "..", "shared", "data")

# name -> (path under the data dir, packaged fallback, hub loader args).
CORPORA = {
    "wikitext2": ("wikitext2/test.txt", "data_files/wikitext2_test.txt.bz2",
                  ("wikitext", "wikitext-2-raw-v1", "test")),
    "c4": ("c4/validation_sample.jsonl", None,
           ("allenai/c4", "en", "validation")),
    "tinystories": ("tinystories/valid.txt", None,
                    ("roneneldan/TinyStories", None, "validation")),
    # Calibration text: Palu calibrates on WikiText-2 train, which is not
    # available offline; the local validation split (tokenized form, with
    # <unk>) stands in, and the hub's train split is used when no local copy
    # exists. Never the test split, which perplexity reports.
    "wikitext2-calib": ("wikitext2/valid.tokens.txt",
                        "data_files/wikitext2_valid_tokens.txt.bz2",
                        ("wikitext", "wikitext-2-raw-v1", "train")),
}
# Corpora whose hub copy (Palu's WikiText-2 train) is preferred to the
# packaged stand-in when no local copy exists.
HUB_BEFORE_PACKAGED = {"wikitext2-calib"}


class DatasetError(PaluError, FileNotFoundError):
  pass


def check_data_dir(override: str | None) -> None:
  """A data root the user named must exist (a typo must not fall back
  silently to another root)."""
  if override is not None and not os.path.isdir(override):
    raise DatasetError(f"{override}: --data-dir is not a directory")


def data_dir(override: str | None = None) -> str:
  """The local data root: `override`, $PALU_JAX_DATA, or ../shared/data."""
  check_data_dir(override)
  return os.path.abspath(override or os.environ.get(DATA_ENV) or _REPO_SHARED)


def _text_of_record(rec: dict, path: str) -> str:
  if "text" in rec:
    return rec["text"]
  if "prompt" in rec and "response" in rec:  # shared/ C4 sample layout
    return rec["prompt"] + rec["response"]
  raise DatasetError(f"{path}: jsonl records need a 'text' field (or "
                     f"'prompt' + 'response'); got keys {sorted(rec)}")


def _read_plain(path: str) -> str:
  """The same text as `_load_local`, without `datasets` (GPU hosts that lack
  it; tests check both agree)."""
  import bz2
  opener = bz2.open if path.endswith(".bz2") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      if path.endswith(".jsonl"):
        return "\n\n".join(_text_of_record(_json_record(line, path, i), path)
                           for i, line in enumerate(f, 1) if line.strip())
      return f.read()
  except UnicodeDecodeError as e:
    raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte "
                       f"{e.start})") from None


def _json_record(line: str, path: str, number: int) -> dict:
  """One .jsonl line as a JSON object (DatasetError naming the line)."""
  try:
    rec = json.loads(line)
  except ValueError as e:
    raise DatasetError(f"{path}: line {number} is not JSON ({e})") from None
  if not isinstance(rec, dict):
    raise DatasetError(f"{path}: line {number} is a JSON "
                       f"{type(rec).__name__}, not an object with 'text'")
  return rec


def _load_local(path: str) -> str:
  """A .txt(.bz2) file as one document, or a .jsonl as documents joined."""
  if path.endswith(".jsonl"):
    # read without `datasets`, whose errors for malformed JSON are
    # tracebacks from its builder
    return _read_plain(path)
  try:
    import datasets
  except ImportError:
    return _read_plain(path)
  datasets.disable_progress_bars()
  ds = datasets.load_dataset("text", data_files=path, sample_by="document",
                             split="train")
  return ds[0]["text"] if len(ds) else ""


def _load_hub(name: str, config: str | None, split: str) -> str:
  import datasets
  if name == "allenai/c4":
    ds = datasets.load_dataset(name, data_files={
        "validation": "en/c4-validation.00000-of-00008.json.gz"}, split=split)
    ds = ds.select(range(min(1100, len(ds))))
  else:
    ds = datasets.load_dataset(name, config, split=split)
  return "\n\n".join(ds["text"])


def load_text(dataset: str, *, data_dir_override: str | None = None) -> str:
  """The evaluation text of a named corpus or of a file path.

  Args:
    dataset: 'wikitext2' | 'c4' | 'tinystories' | path to .txt/.jsonl.

  Returns:
    One string (documents joined by blank lines, as in Palu's evaluation).
  """
  if dataset not in CORPORA:
    if not os.path.exists(dataset):
      raise DatasetError(f"{dataset}: unknown dataset name (known: "
                         f"{sorted(CORPORA)}) and no such file")
    return _load_local(dataset)
  rel, packaged, hub = CORPORA[dataset]
  local = os.path.join(data_dir(data_dir_override), rel)
  if os.path.exists(local):
    return _load_local(local)
  packaged = packaged and os.path.join(_PACKAGE_DIR, packaged)
  if packaged and dataset not in HUB_BEFORE_PACKAGED:
    return _load_local(packaged)
  try:
    return _load_hub(*hub)
  except Exception as e:  # network and hub errors come in many types
    if packaged:
      log.warning("%s: hub copy unavailable (%s); using the packaged %s",
                  dataset, e, os.path.basename(packaged))
      return _load_local(packaged)
    raise DatasetError(f"{local}: dataset {dataset!r} not found locally and "
                       f"the hub copy could not be loaded ({e}); set "
                       f"${DATA_ENV} or --data-dir") from e
