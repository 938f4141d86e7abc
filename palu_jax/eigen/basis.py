"""Principal bases of a layer's keys and values (Eigen Attention).

One basis per layer and side, shared by all of the layer's KV heads: the
right singular vectors of the activations of every head stacked as rows,
R = [X·W_1; X·W_2; …] ([tokens·K, H]). For keys these are pre-RoPE, so the
rebuilt key can still be rotated. The stacked activations are never formed:
RᵀR = Σ_j W_jᵀ·XᵀX·W_j = FᵀF with F = [Sᵀ·W_1; …; Sᵀ·W_K] ([K·D, H]) where
XᵀX = S·Sᵀ, so the SVD of F has R's right singular vectors and singular
values (from the Gram matrices calibration already keeps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from palu_jax.decompose.metrics import psd_factor
from palu_jax.errors import PaluError
from palu_jax.typing import Array


class Basis(NamedTuple):
  """Orthonormal directions of one layer's key or value space."""
  vectors: np.ndarray  # [H, H] columns, by decreasing energy
  energy: np.ndarray   # [H] squared singular values (descending, ≥ 0)

  def projector(self, rank: int) -> np.ndarray:
    """[H, H] orthogonal projection onto the leading `rank` directions."""
    u = self.vectors[:, :rank]
    return u @ u.T


def activation_basis(rows: Array) -> Basis:
  """Basis of stacked activations rows [M, H] by `jnp.linalg.svd`."""
  rows = jnp.asarray(rows, jnp.float32)
  if rows.ndim != 2 or not bool(jnp.all(jnp.isfinite(rows))):
    raise PaluError(f"activations must be a finite [rows, H] matrix, got "
                    f"shape {rows.shape}")
  _, s, vt = jnp.linalg.svd(rows, full_matrices=False)
  h = rows.shape[1]
  vectors = np.zeros((h, h), np.float64)
  energy = np.zeros((h,), np.float64)
  k = s.shape[0]                 # fewer rows than H: pad with a completion
  vectors[:, :k] = np.asarray(vt, np.float64).T
  energy[:k] = np.square(np.asarray(s, np.float64))
  if k < h:
    q, _ = np.linalg.qr(np.concatenate([vectors[:, :k], np.eye(h)], 1))
    vectors[:, k:] = q[:, k:h]
  return Basis(vectors, energy)


def projection_basis(kernel: np.ndarray, gram: np.ndarray, head_dim: int
                     ) -> Basis:
  """Basis of the stacked per-head outputs of a projection.

  Args:
    kernel: [D, K·H] k or v projection kernel (K heads of H).
    gram: [D, D] XᵀX (any positive scale) of its calibration inputs.
  """
  kernel = np.asarray(kernel, np.float64)
  d, width = kernel.shape
  if width % head_dim or gram.shape != (d, d):
    raise PaluError(f"projection {kernel.shape} and Gram {gram.shape} do not "
                    f"fit heads of {head_dim}")
  if not np.all(np.isfinite(gram)):
    raise PaluError("calibration Gram matrix holds NaN/Inf values")
  s = psd_factor(np.asarray(gram, np.float64))
  heads = kernel.reshape(d, width // head_dim, head_dim)
  stacked = np.einsum("DE,DKH->KEH", s, heads).reshape(-1, head_dim)
  # Scale to unit mean energy so float32 SVD sees well-sized numbers.
  scale = max(float(np.sqrt(np.mean(np.square(stacked)))), 1e-30)
  basis = activation_basis(stacked / scale)
  return Basis(basis.vectors, basis.energy * scale ** 2)
