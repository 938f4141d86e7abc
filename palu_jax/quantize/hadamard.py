"""Walsh-Hadamard rotations, to fold into Palu's down/up projections.

A latent h = x·A becomes h' = x·(A·H) with an orthonormal H; the
up-projection becomes Hᵀ·B, so h'·Hᵀ·B = h·B exactly. The rotation spreads
outlier channels over the whole latent, which makes per-token quantization
far more accurate.

A rank that is not a power of two gets a block-diagonal H: blocks of the
largest power of two dividing the rank (e.g. 96 = 3 blocks of 32).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from palu_jax.errors import ConfigError
from palu_jax.typing import Array


def block_size(n: int) -> int:
  """Largest power of two dividing n: the Hadamard block used for width n."""
  if n < 1:
    raise ConfigError("rank", f"must be positive, got {n}")
  return n & -n


def hadamard_matrix(n: int) -> np.ndarray:
  """[n, n] orthonormal Sylvester Hadamard (n a power of two), float64."""
  if n < 1 or n & (n - 1):
    raise ConfigError("rank", f"a Sylvester Hadamard needs a power of two, "
                      f"got {n}")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def rotation(n: int) -> np.ndarray:
  """[n, n] orthonormal block-diagonal Hadamard for a width-n latent."""
  b = block_size(n)
  return np.kron(np.eye(n // b), hadamard_matrix(b))


def fwht(x: Array) -> Array:
  """x·rotation(n) along the last axis in O(n log n) (fast Walsh-Hadamard
  per block), for x [..., n]."""
  n = x.shape[-1]
  b = block_size(n)
  lead = x.shape[:-1]
  y = x.reshape(*lead, n // b, b)
  h = 1
  while h < b:
    y = y.reshape(*lead, n // b, b // (2 * h), 2, h)
    a, c = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + c, a - c], axis=-2)
    h *= 2
  return (y.reshape(*lead, n) / np.sqrt(b)).astype(x.dtype)


def fold_rotation(down: np.ndarray, up: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(A [d, r], B [r, n]) -> (A·H, Hᵀ·B): the same product, rotated latent."""
  h = rotation(down.shape[1])
  return down @ h, h.T @ up
