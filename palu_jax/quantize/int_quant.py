"""Per-token asymmetric integer quantization with real packed storage.

Codes q = round((x − offset) / scale) in 0..2^bits − 1, per group of `group`
consecutive values along the last axis (per token); scale and offset (the
group minimum: the asymmetric "zero") are stored in a 16-bit float. Storage is packed into bytes, bits/8 bytes per code (see `pack`), so the
arrays' bytes are the true cache size and a kernel decodes a tile with
shifts, masks and interleaves only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.quantize.ste import straight_through
from palu_jax.typing import Array

BITS = (2, 3, 4)


def _check(bits: int, n: int, group: int) -> None:
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS}")
  if group < 1 or n % group:
    raise ConfigError("quant_group", f"{group} does not divide the latent "
                      f"width {n}")


def _round_toward(x: Array, dtype, down: bool) -> Array:
  """x (float32) to `dtype`, rounded down (or up) instead of to nearest."""
  c = x.astype(dtype)
  off = c.astype(jnp.float32) > x if down else c.astype(jnp.float32) < x
  toward = jnp.asarray(-jnp.inf if down else jnp.inf, dtype)
  return jnp.where(off, jnp.nextafter(c, toward), c)


@functools.partial(jax.jit, static_argnames=("bits", "group", "scale_dtype"))
def quantize(x: Array, *, bits: int, group: int, scale_dtype=jnp.bfloat16
             ) -> tuple[Array, Array, Array]:
  """x [..., n] -> (codes uint8 [..., n], scale [..., n/group],
  offset [..., n/group]); x ≈ codes·scale + offset.

  The offset is the group minimum rounded *down* to `scale_dtype` and the
  scale (max − offset)/(2^bits − 1) rounded *up*, so with the stored 16-bit
  values every element lies inside the grid and its error is at most
  scale/2.
  """
  n = x.shape[-1]
  _check(bits, n, group)
  g = x.astype(jnp.float32).reshape(*x.shape[:-1], n // group, group)
  levels = 2 ** bits - 1
  offset = _round_toward(jnp.min(g, -1), scale_dtype, down=True)
  span = jnp.max(g, -1) - offset.astype(jnp.float32)
  scale = _round_toward(span / levels, scale_dtype, down=False)
  s = jnp.maximum(scale.astype(jnp.float32), 1e-30)
  q = jnp.round((g - offset.astype(jnp.float32)[..., None]) / s[..., None])
  q = jnp.clip(q, 0, levels)
  return q.astype(jnp.uint8).reshape(x.shape), scale, offset


def dequantize(codes: Array, scale: Array, offset: Array, *, group: int,
               dtype=jnp.float32) -> Array:
  """Inverse of `quantize` (codes unpacked) -> [..., n] in `dtype`."""
  n = codes.shape[-1]
  g = codes.astype(jnp.float32).reshape(*codes.shape[:-1], n // group, group)
  out = g * scale.astype(jnp.float32)[..., None] + offset.astype(
      jnp.float32)[..., None]
  return out.reshape(codes.shape).astype(dtype)


def fake_quantize(x: Array, *, bits: int, group: int,
                  scale_dtype=jnp.bfloat16) -> Array:
  """quantize -> dequantize in x's dtype: the values a packed cache returns.

  Its gradient is the identity (straight-through estimator), so fine-tuning
  a quantized-cache model trains the projections that feed the latents.
  """
  return straight_through(_round_trip, (bits, group, jnp.dtype(scale_dtype)),
                          x)


def _round_trip(x: Array, bits: int, group: int, scale_dtype) -> Array:
  q, scale, offset = quantize(x, bits=bits, group=group,
                              scale_dtype=scale_dtype)
  return dequantize(q, scale, offset, group=group, dtype=x.dtype)


def packed_dtype(bits: int):
  """Storage element: bytes, for every bit width."""
  del bits
  return jnp.uint8


def packed_width(n: int, bits: int) -> int:
  """Bytes per row of n codes: n is padded to a multiple of 8 codes."""
  return -(-n // 8) * bits


def packed_nbytes(n: int, bits: int) -> int:
  """Bytes per row of n packed codes."""
  return packed_width(n, bits) * jnp.dtype(packed_dtype(bits)).itemsize


def _fields(codes: Array, width: int) -> Array:
  """codes [..., m] (< 2^width, m a multiple of 8/width) -> bytes
  [..., m·width/8]; byte i holds codes F·i + f at bits width·f, F = 8/width."""
  per = 8 // width
  c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, per)
  shifts = (jnp.arange(per, dtype=jnp.uint8) * width)
  # disjoint bit ranges: the sum is the bitwise or
  return jnp.sum((c << shifts).astype(jnp.uint32), -1).astype(jnp.uint8)


def _unfields(packed: Array, width: int) -> Array:
  """Inverse of `_fields`: bytes [..., w] -> codes [..., w·8/width]."""
  per = 8 // width
  shifts = jnp.arange(per, dtype=jnp.uint8) * width
  f = (packed[..., None] >> shifts) & jnp.uint8(2 ** width - 1)
  return f.reshape(*packed.shape[:-1], -1)


def pack(codes: Array, bits: int) -> Array:
  """codes uint8 [..., n] (values < 2^bits) -> bytes [..., packed_width].

  Layout (what the decode kernels read):
    4-bit: byte i holds codes 2i (low nibble) and 2i+1 (high nibble);
    2-bit: byte i holds codes 4i+f at bits 2f;
    3-bit: the low two bits as in 2-bit (2·⌈n/8⌉ bytes), then the high bit
           plane: byte i holds bit 2 of codes 8i+f at bit f (⌈n/8⌉ bytes).
  """
  n = codes.shape[-1]
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS}")
  pad = -n % 8
  c = codes.astype(jnp.uint8)
  if pad:
    c = jnp.concatenate([c, jnp.zeros(c.shape[:-1] + (pad,), c.dtype)], -1)
  if bits == 3:
    return jnp.concatenate([_fields(c & 3, 2), _fields(c >> 2, 1)], -1)
  return _fields(c, bits)


def unpack(packed: Array, bits: int, n: int) -> Array:
  """Inverse of `pack`: bytes [..., packed_width] -> codes uint8 [..., n]."""
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS}")
  p = packed.astype(jnp.uint8)
  if bits == 3:
    low = p.shape[-1] * 2 // 3
    codes = _unfields(p[..., :low], 2) | (_unfields(p[..., low:], 1) << 2)
  else:
    codes = _unfields(p, bits)
  return codes[..., :n]
