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
  singular: Array  # [min(d, n)] all singular values (of W or of Sᵀ·W·M)


class Factorization(NamedTuple):
  """A full SVD of a (weighted) projection, ready to truncate at any rank:
  W = left·diag(singular)·right exactly (up to jitter)."""
  left: Array      # [d, m]  (S⁻ᵀ·U for whitened SVD)
  singular: Array  # [m] descending
  right: Array     # [m, n]  (Vᵀ·M⁻¹ with an output metric)

  def truncate(self, rank: int) -> LowRank:
    """The rank-`rank` pair, with √σ split evenly between down and up."""
    if not 1 <= rank <= self.singular.shape[0]:
      raise ConfigError("rank", f"{rank} is impossible for a "
                        f"{self.left.shape[0]}x{self.right.shape[1]} matrix "
                        f"(1..{self.singular.shape[0]})")
    root = jnp.sqrt(self.singular[:rank])
    return LowRank(self.left[:, :rank] * root, root[:, None] * self.right[:rank],
                   self.singular)

  def discarded(self, rank: int) -> float:
    """Σ_{i>rank} σ_i²: the (weighted) squared error of truncating."""
    return float(jnp.sum(jnp.square(self.singular[rank:].astype(jnp.float32))))


def _check_rank(w: Array, rank: int) -> None:
  if not 1 <= rank <= min(w.shape):
    raise ConfigError("rank", f"{rank} is impossible for a {w.shape[0]}x"
                      f"{w.shape[1]} matrix (1..{min(w.shape)})")


def plain_svd(w: Array, rank: int) -> LowRank:
  """Truncated SVD of w [d, n] (minimises ‖W − W'‖_F)."""
  _check_rank(w, rank)
  return factorize(w).truncate(rank)


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


def factorize(w: Array, gram: Array | None = None, *,
              out_factor: Array | None = None,
              jitter: float | None = None) -> Factorization:
  """Full SVD of w [d, n] under the metric ‖Sᵀ·(W − W')·M‖_F.

  Args:
    gram: XᵀX [d, d] of the inputs (whitening, S = chol(XᵀX)); None = I.
    out_factor: M [n, n] lower triangular (an output metric M·Mᵀ: how much
      an error in each output column costs downstream); None = I.
  """
  return factorize_many([w], gram, out_factors=[out_factor], jitter=jitter,
                        devices=[None])[0]


@jax.jit
def _factor(w: Array, s_low: Array | None, out_factor: Array | None):
  """SVD of Sᵀ·W·M (S, M optional) mapped back: (S⁻ᵀ·U, σ, Vᵀ·M⁻¹)."""
  target = w if s_low is None else s_low.T @ w
  if out_factor is not None:
    target = target @ out_factor
  u, sig, vt = jnp.linalg.svd(target, full_matrices=False)
  if s_low is not None:
    # down = S⁻ᵀ·U: solve Sᵀ·down = U.
    u = jax.scipy.linalg.solve_triangular(s_low, u, trans="T", lower=True)
  if out_factor is not None:
    # up = Vᵀ·M⁻¹: solve Mᵀ·upᵀ = V.
    vt = jax.scipy.linalg.solve_triangular(out_factor, vt.T, trans="T",
                                           lower=True).T
  return u, sig, vt


def factorize_many(ws, gram: Array | None = None, *, out_factors=None,
                   jitter: float | None = None, devices=None
                   ) -> list[Factorization]:
  """`factorize` of several w [d, n_i] with one input Gram (the head groups
  of a layer): the whitening Cholesky once, then one SVD per matrix, spread
  round-robin over `devices` (default: this process's devices). They are
  all dispatched before any result is read, so they run concurrently, one
  per device; the factors come back as host arrays."""
  s_low = None if gram is None else whitening_factor(gram, jitter=jitter)[0]
  devices = list(devices) if devices is not None else jax.local_devices()
  out_factors = out_factors or [None] * len(ws)
  if len(out_factors) != len(ws):
    raise ValueError(f"{len(out_factors)} output factors for {len(ws)} "
                     "matrices")
  pending = []
  for i, (w, m) in enumerate(zip(ws, out_factors)):
    args = (jnp.asarray(w, jnp.float32), s_low,
            None if m is None else jnp.asarray(m, jnp.float32))
    device = devices[i % len(devices)]
    if device is not None:
      args = jax.device_put(args, device)
    pending.append(_factor(*args))
  return [Factorization(*(np.asarray(a) for a in f)) for f in pending]


def whitened_svd(w: Array, gram: Array, rank: int, *,
                 jitter: float | None = None,
                 out_factor: Array | None = None) -> LowRank:
  """Truncated SVD of w [d, n] that minimises ‖X·W − X·W'‖ (XᵀX = gram),
  or ‖X·(W − W')·M‖ with an output metric factor M."""
  _check_rank(w, rank)
  return factorize(w, gram, out_factor=out_factor, jitter=jitter).truncate(rank)


def activation_error(x: Array, w: Array, lr: LowRank) -> float:
  """‖X·W − X·down·up‖_F² (float64 on the host, for tests and reports)."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  approx = np.asarray(lr.down, np.float64) @ np.asarray(lr.up, np.float64)
  return float(np.sum((x64 @ (w64 - approx)) ** 2))
