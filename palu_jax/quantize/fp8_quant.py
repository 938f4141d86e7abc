"""Per-token float8 (e4m3) latents with one scale per group.

Codes are `float8_e4m3fn` arrays (one byte per latent, no packing); each
group of `group` consecutive latents of a token shares a scale stored in a
16-bit float (`scale_dtype`, bfloat16 by default): x ≈ code·scale. The scale
is the power of two at or above the group's max |x| / 448 (e4m3's largest
finite value), so no code saturates, and code·scale is exact in bf16, fp16
and f32: a kernel that applies the scale after an fp8 dot and the jnp path
that multiplies first see the same numbers. (A power of two costs e4m3
nothing above its smallest normal: its precision is relative.) e4m3 rounds
to nearest even, with 3 mantissa bits (relative error ≤ 2^-4) above its
smallest normal 2^-6 and an absolute step of 2^-9·scale below it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.quantize.ste import straight_through
from palu_jax.typing import Array
# the e4m3 code type, its largest finite value and the power-of-two scale
# live with the kernels that read the codes (one definition for both)
from pallas_kernels.common import E4M3_CODE as CODE_DTYPE
from pallas_kernels.common import E4M3_MAX, pow2_scale  # noqa: F401


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def quantize(x: Array, *, group: int, scale_dtype=jnp.bfloat16
             ) -> tuple[Array, Array]:
  """x [..., n] -> (codes float8_e4m3fn [..., n], scale [..., n/group])."""
  n = x.shape[-1]
  if group < 1 or n % group:
    raise ConfigError("quant_group", f"{group} does not divide the latent "
                      f"width {n}")
  g = x.astype(jnp.float32).reshape(*x.shape[:-1], n // group, group)
  scale = pow2_scale(jnp.max(jnp.abs(g), -1), scale_dtype)
  codes = (g / scale.astype(jnp.float32)[..., None]).astype(CODE_DTYPE)
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
  return straight_through(_round_trip, (group, jnp.dtype(scale_dtype)), x)


def _round_trip(x: Array, group: int, scale_dtype) -> Array:
  codes, scale = quantize(x, group=group, scale_dtype=scale_dtype)
  # the codes behind a barrier: XLA:GPU would otherwise fold the
  # f32 -> e4m3 -> f32 conversions into nothing (`narrow_values`)
  codes = jax.lax.optimization_barrier(codes)
  return dequantize(codes, scale, group=group, dtype=x.dtype)


def round_weight_columns(w, row_blocks) -> "np.ndarray":
  """B_k in e4m3 (issue 18): w [R, C] (numpy), each block of rows (one
  latent group's ranks) with one power-of-two scale per column. Returns the
  values code·scale in float32, exact in bf16, so the jnp path computes with
  exactly the weights an fp8 kernel would (codes, scales applied after the
  dot)."""
  import numpy as np
  w = np.asarray(w, np.float32)
  out = np.empty_like(w)
  start = 0
  for rows in row_blocks:
    block = jnp.asarray(w[start:start + rows])
    scale = pow2_scale(jnp.max(jnp.abs(block), 0), jnp.float32)
    codes = (block / scale).astype(CODE_DTYPE)
    out[start:start + rows] = np.asarray(codes.astype(jnp.float32) * scale)
    start += rows
  if start != w.shape[0]:
    raise ConfigError("k_ranks", f"row blocks sum to {start}, the weight has "
                      f"{w.shape[0]} rows")
  return out
