"""Per-token asymmetric integer quantization with real packed storage.

Codes q = round((x − offset) / scale) in 0..2^bits − 1, per group of `group`
consecutive values along the last axis (per token); scale and offset (the
group minimum: the asymmetric "zero") are stored in a 16-bit float. Storage is packed: 4-bit codes two to a byte (uint8),
3- and 2-bit codes densely bit-packed into uint32 words (a code may straddle
two words), so the arrays' bytes are the true cache size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from palu_jax.errors import ConfigError
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
  """quantize -> dequantize in x's dtype: the values a packed cache returns."""
  q, scale, offset = quantize(x, bits=bits, group=group,
                              scale_dtype=scale_dtype)
  return dequantize(q, scale, offset, group=group, dtype=x.dtype)


def packed_dtype(bits: int):
  """Storage element: bytes for 4-bit codes, uint32 words for 3/2-bit."""
  return jnp.uint8 if bits == 4 else jnp.uint32


def packed_width(n: int, bits: int) -> int:
  """Storage elements per row of n codes (see `packed_dtype`)."""
  if bits == 4:
    return (n + 1) // 2
  return (n * bits + 31) // 32


def packed_nbytes(n: int, bits: int) -> int:
  """Bytes per row of n packed codes."""
  return packed_width(n, bits) * jnp.dtype(packed_dtype(bits)).itemsize


def pack(codes: Array, bits: int) -> Array:
  """codes uint8 [..., n] (values < 2^bits) -> packed [..., packed_width]."""
  n = codes.shape[-1]
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS}")
  c = codes.astype(jnp.uint32)
  if bits == 4:
    if n % 2:
      c = jnp.concatenate([c, jnp.zeros(c.shape[:-1] + (1,), c.dtype)], -1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(packed_dtype(bits))
  words = packed_width(n, bits)
  start = jnp.arange(n, dtype=jnp.uint32) * bits         # bit offset of code i
  word, shift = start // 32, start % 32
  out = jnp.zeros(c.shape[:-1] + (words,), jnp.uint32)
  low = c << shift                                       # part in `word`
  out = out.at[..., word].add(low)  # disjoint bit ranges: add == or
  spill = (shift + bits) > 32                            # straddles a word
  high = jnp.where(spill, c >> (32 - shift) % 32, 0)
  nxt = jnp.minimum(word + 1, words - 1)
  return out.at[..., nxt].add(jnp.where(spill, high, 0).astype(jnp.uint32))


def unpack(packed: Array, bits: int, n: int) -> Array:
  """Inverse of `pack`: packed [..., packed_width] -> codes uint8 [..., n]."""
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS}")
  if bits == 4:
    p = packed.astype(jnp.uint8)
    both = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(
        p.shape[:-1] + (2 * p.shape[-1],))
    return both[..., :n]
  w = packed.astype(jnp.uint32)
  start = jnp.arange(n, dtype=jnp.uint32) * bits
  word, shift = start // 32, start % 32
  mask = jnp.uint32(2 ** bits - 1)
  low = w[..., word] >> shift
  nxt = jnp.minimum(word + 1, w.shape[-1] - 1)
  spill = (shift + bits) > 32
  high = jnp.where(spill, w[..., nxt] << ((32 - shift) % 32), 0)
  return ((low | high) & mask).astype(jnp.uint8)
