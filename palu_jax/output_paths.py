"""Where a command may write a model directory, checked before any work.

A command replaces an existing directory only when asked (`overwrite`), and
only a palu-jax model directory (it holds the marker file), never the
source it reads, a folder that contains that source, or the folder the
user is in. Stale temporary siblings (`.NAME.tmp-*`) left by an
interrupted write are removed before the next write to NAME.
"""

from __future__ import annotations

import glob
import os
import shutil

from palu_jax.errors import CheckpointError

MARKER = "palu_jax.json"


def _inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies below it (both real paths)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str, *, overwrite: bool,
                     sources: tuple[str, ...] = ()) -> str:
  """Raises CheckpointError unless a model may be written to out_dir;
  returns its absolute path. `sources`: paths the command reads."""
  if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
    raise CheckpointError(str(out_dir), "output directory must be a "
                          "non-empty path")
  out = os.path.abspath(out_dir)
  real = os.path.realpath(out)
  for src in sources:
    if src and os.path.exists(src) and _inside(os.path.realpath(src), real):
      raise CheckpointError(out, f"is the source {src} or contains it; "
                            "write the output somewhere else")
  if _inside(os.path.realpath(os.getcwd()), real):
    raise CheckpointError(out, "is the current directory or contains it")
  if os.path.lexists(out):
    if not overwrite:
      raise CheckpointError(out, "output directory already exists (pass "
                            "overwrite=True / --overwrite to replace it)")
    if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, MARKER)):
      raise CheckpointError(out, "exists and is not a palu-jax model "
                            f"directory (no {MARKER}): --overwrite only "
                            "replaces a model directory")
  _check_writable(out, os.path.dirname(out), "")
  return out


def check_output_file_dir(folder: str, what: str = "--out") -> str:
  """A results folder (created if missing) must be writable; returns it."""
  out = os.path.abspath(folder)
  _check_writable(out, out, f"{what}: ")
  return out


def _check_writable(out: str, start: str, prefix: str) -> None:
  """The nearest existing folder at or above `start` must be a writable
  directory (the rest of the path is created under it)."""
  probe = start
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise CheckpointError(out, f"{prefix}cannot write here ({probe} is not a "
                          "writable directory)")


def remove_stale_temporaries(out_dir: str) -> None:
  """Deletes `.NAME.tmp-*` siblings of out_dir that interrupted writes left."""
  out = os.path.abspath(out_dir)
  pattern = os.path.join(os.path.dirname(out),
                         f".{glob.escape(os.path.basename(out))}.tmp-*")
  for stale in glob.glob(pattern):
    shutil.rmtree(stale, ignore_errors=True)
