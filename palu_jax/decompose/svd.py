"""Plain and activation-whitened truncated SVD, row-vector convention.

A projection y = x·W with W [d, n] becomes y ≈ (x·down)·up with down [d, r]
and up [r, n]; the latent x·down is what a Palu cache stores.

Whitened SVD (SVD-LLM, used by Palu): with calibration inputs X [tokens, d]
and XᵀX = S·Sᵀ (Cholesky, S lower), ‖X·W − X·W'‖_F = ‖Sᵀ·(W − W')‖_F. So the
SVD Sᵀ·W = U·Σ·Vᵀ truncated to r gives the rank-r W' of least output error on
the calibration data:  down = S⁻ᵀ·U_r·√Σ_r,  up = √Σ_r·V_rᵀ, and the
discarded error is Σ_{i>r} σ_i².
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from palu_jax.errors import ConfigError, PaluError
from palu_jax.typing import Array

log = logging.getLogger(__name__)


class LowRank(NamedTuple):
  down: Array      # [d, r]
  up: Array        # [r, n]
  singular: Array  # [min(d, n)] all singular values (of W or of Sᵀ·W)


def _check_rank(w: Array, rank: int) -> None:
  if not 1 <= rank <= min(w.shape):
    raise ConfigError("rank", f"{rank} is impossible for a {w.shape[0]}x"
                      f"{w.shape[1]} matrix (1..{min(w.shape)})")


@functools.partial(jax.jit, static_argnames=("rank",))
def _split(u: Array, s: Array, vt: Array, rank: int) -> tuple[Array, Array]:
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def plain_svd(w: Array, rank: int) -> LowRank:
  """Truncated SVD of w [d, n] (minimises ‖W − W'‖_F)."""
  _check_rank(w, rank)
  w = jnp.asarray(w, jnp.float32)
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  down, up = _split(u, s, vt, rank)
  return LowRank(down, up, s)


def whitening_factor(gram: Array, *, jitter: float | None = None,
                     max_tries: int = 8) -> tuple[Array, float]:
  """Lower Cholesky factor S of gram + λI, with λ found automatically.

  Args:
    gram: [d, d] XᵀX in float32.
    jitter: fixed λ; None starts at 0 and, if the factorisation fails, tries
      1e-6·mean(diag) growing 10x per try (with a warning).

  Returns:
    (S [d, d], λ used).
  """
  gram = jnp.asarray(gram, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(gram))):
    raise PaluError("calibration Gram matrix holds NaN/Inf values; check the "
                    "calibration data and model dtype")
  scale = float(jnp.mean(jnp.diag(gram)))
  eye = jnp.eye(gram.shape[0], dtype=jnp.float32)
  tries = [jitter] if jitter is not None else [0.0] + [
      scale * 1e-6 * 10 ** k for k in range(max_tries)]
  for lam in tries:
    s = jnp.linalg.cholesky(gram + lam * eye)
    if bool(jnp.all(jnp.isfinite(s))):
      if lam and jitter is None:
        log.warning("XᵀX is not positive definite; added jitter λ=%.3g "
                    "(%.1e of its mean diagonal)", lam, lam / max(scale, 1e-30))
      return s, float(lam)
  raise PaluError(f"XᵀX is not positive definite even with jitter "
                  f"{tries[-1]:.3g}; is the calibration data degenerate?")


def whitened_svd(w: Array, gram: Array, rank: int, *,
                 jitter: float | None = None) -> LowRank:
  """Truncated SVD of w [d, n] that minimises ‖X·W − X·W'‖ (XᵀX = gram)."""
  _check_rank(w, rank)
  w = jnp.asarray(w, jnp.float32)
  s_low, _ = whitening_factor(gram, jitter=jitter)
  u, sig, vt = jnp.linalg.svd(s_low.T @ w, full_matrices=False)
  left, up = _split(u, sig, vt, rank)
  # down = S⁻ᵀ·U_r·√Σ_r: solve Sᵀ·down = U_r·√Σ_r.
  down = jax.scipy.linalg.solve_triangular(s_low, left, trans="T", lower=True)
  return LowRank(down, up, sig)


def activation_error(x: Array, w: Array, lr: LowRank) -> float:
  """‖X·W − X·down·up‖_F² (float64 on the host, for tests and reports)."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  approx = np.asarray(lr.down, np.float64) @ np.asarray(lr.up, np.float64)
  return float(np.sum((x64 @ (w64 - approx)) ** 2))
