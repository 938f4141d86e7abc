"""The straight-through estimator shared by every fake quantizer."""

from __future__ import annotations

import functools

import jax

from palu_jax.typing import Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def straight_through(round_trip, static: tuple, x: Array) -> Array:
  """round_trip(x, *static) in value, the identity in derivative, so a
  quantized-cache model trains the projections that feed the latents.
  `round_trip` is a module-level function and `static` a tuple of hashable
  settings (bits, group, scale dtype)."""
  return round_trip(x, *static)


@straight_through.defjvp
def _straight_through_jvp(round_trip, static, primals, tangents):
  (x,), (dx,) = primals, tangents
  return straight_through(round_trip, static, x), dx
