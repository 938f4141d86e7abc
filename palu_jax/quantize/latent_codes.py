"""Latent-cache codes at any supported precision, behind one interface.

  bits 4 / 3 / 2  packed unsigned integers with a scale and an offset per
                  group (`int_quant`);
  bits 8          float8 e4m3 codes with a scale per group and no offset
                  (`fp8_quant`): the offset arrays have width 0.
The cache (`palu_jax.model.cache`) and the cache-free forward call only
this module, so both see the same rounding.
"""

from __future__ import annotations

import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.quantize import fp8_quant, int_quant
from palu_jax.typing import Array

BITS = (8, 4, 3, 2)


def _check_bits(bits: int) -> None:
  if bits not in BITS:
    raise ConfigError("kv_bits", f"{bits} not in {BITS} (16 stores latents "
                      "unquantized)")


def quantize(x: Array, *, bits: int, group: int, scale_dtype=jnp.bfloat16
             ) -> tuple[Array, Array, Array]:
  """x [..., n] -> (stored codes, scale [..., n/group], offset [..., n/group]
  or [..., 0] for fp8). Integer codes come packed (`packed_width`)."""
  _check_bits(bits)
  if bits == 8:
    codes, scale = fp8_quant.quantize(x, group=group, scale_dtype=scale_dtype)
    return codes, scale, jnp.zeros(scale.shape[:-1] + (0,), scale.dtype)
  q, scale, offset = int_quant.quantize(x, bits=bits, group=group,
                                        scale_dtype=scale_dtype)
  return int_quant.pack(q, bits), scale, offset


def dequantize(stored: Array, scale: Array, offset: Array, *, bits: int,
               group: int, width: int, dtype=jnp.float32) -> Array:
  """Stored codes -> values [..., width] in `dtype`."""
  _check_bits(bits)
  if bits == 8:
    return fp8_quant.dequantize(stored, scale, group=group, dtype=dtype)
  q = int_quant.unpack(stored, bits, width)
  return int_quant.dequantize(q, scale, offset, group=group, dtype=dtype)


def fake_quantize(x: Array, *, bits: int, group: int,
                  scale_dtype=jnp.bfloat16) -> Array:
  """The values a cache of this precision returns for x (STE gradient)."""
  _check_bits(bits)
  if bits == 8:
    return fp8_quant.fake_quantize(x, group=group, scale_dtype=scale_dtype)
  return int_quant.fake_quantize(x, bits=bits, group=group,
                                 scale_dtype=scale_dtype)


def stored_shape(width: int, bits: int, group: int
                 ) -> tuple[tuple[int, object], int, int]:
  """((code columns, code dtype), scale columns, offset columns) per token
  for `width` latents."""
  _check_bits(bits)
  if bits == 8:
    return (width, fp8_quant.CODE_DTYPE), width // group, 0
  return ((int_quant.packed_width(width, bits), int_quant.packed_dtype(bits)),
          width // group, width // group)


def bytes_per_token(width: int, bits: int, group: int,
                    scale_bytes: int = 2) -> int:
  """Cache bytes of `width` latents of one token: codes + scales (+
  offsets for integer codes)."""
  (cols, dtype), n_scale, n_offset = stored_shape(width, bits, group)
  return cols * jnp.dtype(dtype).itemsize + scale_bytes * (n_scale + n_offset)
