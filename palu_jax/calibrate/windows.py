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
