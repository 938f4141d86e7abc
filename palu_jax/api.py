"""High-level loading: a model directory or source checkpoint -> NNX model."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from palu_jax.checkpoint import (is_model_dir, load_model_dir, load_source,
                                 load_tokenizer_for, read_model_config)
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
  return cfg, params, _palu_of(meta, src), meta


def _palu_of(meta: dict[str, Any], src) -> PaluConfig | None:
  """A compressed checkpoint's PaluConfig from its marker (None: dense)."""
  if meta.get("kind") != "palu":
    return None
  if "palu" not in meta:
    raise CheckpointError(src, "compressed checkpoint without its 'palu' "
                          "ranks", field="palu")
  return PaluConfig.from_dict(meta["palu"])


def load_model(src: str, *, dtype: str = "bfloat16", mesh=None
               ) -> tuple[Transformer, object]:
  """Loads (model, tokenizer) from a converted directory or a source.

  Args:
    src: converted or Palu-compressed model directory, HF directory, .gguf,
      llama2.c .bin, or a preset name such as 'smollm2-135m'.
    dtype: 'bfloat16' (default) or 'float32' weights and activations.
    mesh: a ("data", "model") mesh: the parameters are placed on it by
      their logical axes (`palu_jax.sharding`). A model directory is
      restored straight into the shards; other sources are read on the
      host first, then each weight goes to its shards.
  """
  if mesh is not None and os.path.isdir(src) and is_model_dir(src):
    return _load_sharded(src, parse_dtype(dtype), mesh), load_tokenizer_for(
        src)
  cfg, params, palu, _ = load_params(src)
  model = from_params(cfg, params, dtype=parse_dtype(dtype), palu=palu,
                      mesh=mesh)
  return model, load_tokenizer_for(src)


def _load_sharded(path: str, dtype, mesh) -> Transformer:
  """A model directory restored into the shards its parameters' logical
  axes give on `mesh`."""
  from flax import nnx
  from palu_jax.sharding.shard import flat_shardings
  cfg, meta = read_model_config(path)
  palu = _palu_of(meta, path)
  abstract = nnx.eval_shape(lambda: Transformer(
      cfg, dtype=dtype, rngs=nnx.Rngs(0), palu=palu))
  _, params, _ = load_model_dir(
      path, shardings=flat_shardings(nnx.state(abstract), mesh))
  return from_params(cfg, params, dtype=dtype, palu=palu)
