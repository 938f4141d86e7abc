"""High-level loading: a model directory or source checkpoint -> NNX model."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from palu_jax.checkpoint import load_source, load_tokenizer_for
from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.errors import CheckpointError, ConfigError
from palu_jax.model import Transformer, from_params

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32,
          "float16": jnp.float16}


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ConfigError("dtype", f"{name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def load_params(src: str) -> tuple[ModelConfig, dict[str, np.ndarray],
                                   PaluConfig | None, dict[str, Any]]:
  """(config, flat numpy params, PaluConfig or None, marker) of a converted
  or compressed directory or a source checkpoint."""
  if not isinstance(src, (str, os.PathLike)) or not str(src).strip():
    raise CheckpointError(str(src), "model must be a path or a preset name "
                          "such as 'smollm2-135m'")
  cfg, params, meta = load_source(os.fspath(src))
  palu = None
  if meta.get("kind") == "palu":
    if "palu" not in meta:
      raise CheckpointError(src, "compressed checkpoint without its 'palu' "
                            "ranks", field="palu")
    palu = PaluConfig.from_dict(meta["palu"])
  return cfg, params, palu, meta


def load_model(src: str, *, dtype: str = "bfloat16"
               ) -> tuple[Transformer, object]:
  """Loads (model, tokenizer) from a converted directory or a source.

  Args:
    src: converted or Palu-compressed model directory, HF directory, .gguf,
      llama2.c .bin, or a preset name such as 'smollm2-135m'.
    dtype: 'bfloat16' (default) or 'float32' weights and activations.
  """
  cfg, params, palu, _ = load_params(src)
  model = from_params(cfg, params, dtype=parse_dtype(dtype), palu=palu)
  return model, load_tokenizer_for(src)
