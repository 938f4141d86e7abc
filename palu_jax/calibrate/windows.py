"""Validation of calibration token windows."""

from __future__ import annotations

import numpy as np

from palu_jax.errors import PaluError


def as_windows(windows) -> np.ndarray:
  """[N, T] int32 windows, or a clear error for anything else."""
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or len(windows) == 0:
    raise PaluError(f"calibration windows must be a non-empty [N, T] array, "
                    f"got shape {windows.shape}")
  return windows


def sample_windows(token_ids, *, count: int, seqlen: int, seed: int = 0
                   ) -> np.ndarray:
  """`count` random windows [count, seqlen] of a token stream (Palu's
  calibration sampling: uniform start offsets, seeded)."""
  ids = np.asarray(token_ids, np.int32)
  if count < 1 or seqlen < 2:
    raise PaluError(f"calibration needs >= 1 window of >= 2 tokens, got "
                    f"{count} x {seqlen}")
  if len(ids) <= seqlen:
    raise PaluError(f"calibration corpus has {len(ids)} tokens, not enough "
                    f"for windows of {seqlen}")
  starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, count)
  return np.stack([ids[s:s + seqlen] for s in starts])
