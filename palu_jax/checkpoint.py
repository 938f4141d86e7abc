"""Converted-model directories: orbax params + config JSON + tokenizer.

Layout of a model directory::

  palu_jax.json     marker: format version, kind, source, dtype (written last)
  config.json       ModelConfig.to_dict()
  params/           orbax checkpoint of the nested parameter dict
  tokenizer.*       whatever the tokenizer's `save` writes

Writes are atomic: everything goes to a sibling temporary directory that is
renamed into place only when complete, so an interrupted conversion never
leaves a directory that loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

import convert
from palu_jax.config import ModelConfig
from palu_jax.errors import CheckpointError
from palu_jax.output_paths import (MARKER, check_output_dir,
                                   remove_stale_temporaries)

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(out_dir: str, *, overwrite: bool = False,
                     sources: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields a temp dir that replaces `out_dir` only if the block succeeds.
  Only a palu-jax model directory is ever replaced, never a source
  (`output_paths.check_output_dir`)."""
  out_dir = check_output_dir(out_dir, overwrite=overwrite, sources=sources)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  remove_stale_temporaries(out_dir)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      old = tmp + ".old"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file via rename, so readers never see half of it."""
  atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes a file via rename, so readers never see half of it."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)   # mkstemp's 0600 would follow the file
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def _nested(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def save_model(out_dir: str, cfg: ModelConfig, params: Mapping[str, Any], *,
               tokenizer=None, meta: Mapping[str, Any] | None = None,
               overwrite: bool = False,
               extra_files: Mapping[str, str | bytes] | None = None,
               sources: tuple[str, ...] = ()) -> str:
  """Writes a model directory atomically; returns its absolute path.

  `meta` entries go into the marker (a compressed model's `kind: palu` and
  ranks); `extra_files` (text or bytes) are written beside it (reports,
  adapters).
  """
  import orbax.checkpoint as ocp
  with atomic_directory(out_dir, overwrite=overwrite, sources=sources) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)
    tree = _nested({k: jnp.asarray(v) for k, v in params.items()})
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), tree)
    ckptr.wait_until_finished()
    if tokenizer is not None:
      tokenizer.save(tmp)
    for name, content in (extra_files or {}).items():
      with open(os.path.join(tmp, name),
                "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    dtypes = sorted({str(np.asarray(v).dtype) for v in params.values()})
    marker = {"format": "palu-jax", "version": FORMAT_VERSION, "kind": "base",
              "dtypes": dtypes, **(meta or {})}
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(marker, f, indent=1)
  return os.path.abspath(out_dir)


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


def read_marker(path: str) -> dict[str, Any]:
  marker = os.path.join(path, MARKER)
  if not os.path.isfile(marker):
    raise CheckpointError(marker, "not a palu-jax model directory (no "
                          f"{MARKER}; an interrupted conversion leaves none)")
  try:
    with open(marker) as f:
      meta = json.load(f)
  except ValueError as e:
    raise CheckpointError(marker, f"invalid JSON: {e}") from e
  if meta.get("format") != "palu-jax" or meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(marker, f"unsupported format {meta.get('format')!r} "
                          f"version {meta.get('version')!r}", field="version")
  return meta


def read_model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, marker) of a model directory, without its parameters."""
  meta = read_marker(path)
  cfg_path = os.path.join(path, "config.json")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
    if not isinstance(raw, dict):
      raise CheckpointError(cfg_path, f"must hold a JSON object, got a "
                            f"{type(raw).__name__}")
    cfg = ModelConfig.from_dict(raw)
  except FileNotFoundError as e:
    raise CheckpointError(cfg_path, "config.json is missing") from e
  except ValueError as e:
    raise CheckpointError(cfg_path, str(e)) from e
  return cfg, meta


def load_model_dir(path: str, *, shardings: Mapping[str, Any] | None = None
                   ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """Reads (config, flat params, marker) from a model directory.

  Without `shardings` the parameters are numpy arrays. With shardings
  ({flat key: jax Sharding}, e.g. from `palu_jax.sharding.shard`), each
  is restored by orbax straight into its shards as a jax array in its
  stored dtype (keys without one are replicated), so no device holds a
  full copy of a sharded weight.
  """
  import orbax.checkpoint as ocp
  cfg, meta = read_model_config(path)
  params_dir = os.path.join(os.path.abspath(path), "params")  # orbax: absolute
  if not os.path.isdir(params_dir):
    raise CheckpointError(params_dir, "parameter checkpoint is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    if shardings is None:
      tree = ckptr.restore(params_dir)
    else:
      tree = ckptr.restore(params_dir, _sharded_target(
          ckptr.metadata(params_dir).item_metadata.tree, shardings))
  except Exception as e:  # orbax raises many types for damaged checkpoints
    raise CheckpointError(params_dir, f"cannot restore parameters: {e}") from e
  flat = _flat(tree)
  if shardings is None:
    flat = {k: np.asarray(v) for k, v in flat.items()}
  return cfg, flat, meta


def _sharded_target(metadata: Mapping[str, Any],
                    shardings: Mapping[str, Any]) -> dict:
  """Orbax restore target: each stored array's shape and dtype with its
  sharding (replicated on the same mesh where none is given)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = next(iter(shardings.values())).mesh
  out = {}
  for key, m in _flat(metadata).items():
    sharding = shardings.get(key, NamedSharding(mesh, PartitionSpec()))
    out[key] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                    sharding=sharding)
  return _nested(out)


def load_source(src: str) -> tuple[ModelConfig, dict[str, np.ndarray],
                                   dict[str, Any]]:
  """(config, params, meta) from a model directory or any source checkpoint."""
  name = os.path.basename(os.path.normpath(src))
  if os.path.isdir(src) and name.startswith(".") and ".tmp-" in name:
    raise CheckpointError(src, "a temporary directory left by an interrupted "
                          "palu-jax write, not a model (the next write to "
                          "that name removes it)")
  if os.path.isdir(src) and is_model_dir(src):
    return load_model_dir(src)
  cfg, params = convert.load_checkpoint(src)
  return ModelConfig.from_dict(cfg), params, {"kind": "base", "source": src}


def load_tokenizer_for(src: str):
  """The tokenizer of a model directory or source checkpoint (or None)."""
  where = convert.find_tokenizer_source(src)
  return None if where is None else convert.load_tokenizer(where)


def convert_checkpoint(src: str, out_dir: str, *, overwrite: bool = False
                       ) -> str:
  """Source checkpoint -> palu-jax model directory (atomic)."""
  check_output_dir(out_dir, overwrite=overwrite, sources=(src,))
  cfg, params = convert.load_checkpoint(src)
  tok = load_tokenizer_for(src)
  return save_model(out_dir, ModelConfig.from_dict(cfg), params, tokenizer=tok,
                    meta={"source": os.path.abspath(convert.resolve_source(src))},
                    overwrite=overwrite, sources=(src,))
