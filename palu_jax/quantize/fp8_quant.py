"""Per-token float8 (e4m3) latents with one scale per group.

Codes are `float8_e4m3fn` arrays (one byte per latent, no packing); each
group of `group` consecutive latents of a token shares a scale stored in a
16-bit float (`scale_dtype`, bfloat16 by default): x ≈ code·scale. The scale
is the group's max |x| / 448 (e4m3's largest finite value) rounded *up* to
the scale dtype, so no code saturates; e4m3 rounds to nearest even, with 3
mantissa bits (relative error ≤ 2^-4) above its smallest normal 2^-6 and an
absolute step of 2^-9·scale below it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.typing import Array

CODE_DTYPE = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def _round_up(x: Array, dtype) -> Array:
  """x (float32) to `dtype`, rounded up instead of to nearest."""
  c = x.astype(dtype)
  return jnp.where(c.astype(jnp.float32) < x,
                   jnp.nextafter(c, jnp.asarray(jnp.inf, dtype)), c)


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def quantize(x: Array, *, group: int, scale_dtype=jnp.bfloat16
             ) -> tuple[Array, Array]:
  """x [..., n] -> (codes float8_e4m3fn [..., n], scale [..., n/group])."""
  n = x.shape[-1]
  if group < 1 or n % group:
    raise ConfigError("quant_group", f"{group} does not divide the latent "
                      f"width {n}")
  g = x.astype(jnp.float32).reshape(*x.shape[:-1], n // group, group)
  scale = _round_up(jnp.max(jnp.abs(g), -1) / E4M3_MAX, scale_dtype)
  s = jnp.maximum(scale.astype(jnp.float32), 1e-30)     # all-zero groups
  codes = (g / s[..., None]).astype(CODE_DTYPE)
  return codes.reshape(x.shape), scale


def dequantize(codes: Array, scale: Array, *, group: int,
               dtype=jnp.float32) -> Array:
  """Inverse of `quantize` -> [..., n] in `dtype` (f32 arithmetic)."""
  n = codes.shape[-1]
  g = codes.astype(jnp.float32).reshape(*codes.shape[:-1], n // group, group)
  out = g * scale.astype(jnp.float32)[..., None]
  return out.reshape(codes.shape).astype(dtype)


def fake_quantize(x: Array, *, group: int, scale_dtype=jnp.bfloat16
                  ) -> Array:
  """quantize -> dequantize in x's dtype: what an fp8 cache returns. Its
  gradient is the identity (straight-through), as for the integer codes."""
  return _fake_quantize_ste(x, group, jnp.dtype(scale_dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_quantize_ste(x: Array, group: int, scale_dtype) -> Array:
  codes, scale = quantize(x, group=group, scale_dtype=scale_dtype)
  return dequantize(codes, scale, group=group, dtype=x.dtype)


@_fake_quantize_ste.defjvp
def _fake_quantize_jvp(group, scale_dtype, primals, tangents):
  (x,), (dx,) = primals, tangents
  return _fake_quantize_ste(x, group, scale_dtype), dx
