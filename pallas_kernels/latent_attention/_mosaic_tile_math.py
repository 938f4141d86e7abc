"""Plain math the Mosaic GPU latent kernel runs on register tiles: RoPE by
angle sums, the folded scores, the online-softmax step, the query's two
e4m3 parts, and the column orders of int4 codes as registers hold them.
Plain functions of arrays: the kernel calls them on register tiles, the
CPU tests on jnp arrays."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.common import E4M3_CODE, E4M3_MAX, Array, narrow_values


def angle_sum(cos_i, sin_i, c0, z0):
  """cos/sin of (a + b) from those of a (cos_i, sin_i) and b (c0, z0)."""
  return cos_i * c0 - sin_i * z0, sin_i * c0 + cos_i * z0


def rotate_halves(k1, k2, cos, sin):
  """RoPE in the rotate-half layout on the two halves of a key."""
  return k1 * cos - k2 * sin, k2 * cos + k1 * sin


def folded_scores(c, d, cos_i, sin_i, c0, z0):
  """RoPE scores from a query folded into B_k (`rope_mode="fold"`).

  c, d [rows, H/2]: h_k·U and h_k·V, where U[r, i] = B1[r, i]·q1_i +
  B2[r, i]·q2_i and V[r, i] = B1[r, i]·q2_i − B2[r, i]·q1_i (rotate-half
  halves of B_k and of the rotated query). With the key angle
  (s0 + row)·θ_i = a + b split into the row's (cos_i, sin_i) and the
  sub-tile start's (c0, z0):  q·rot(k) = Σ_i cos(a+b)·c_i + sin(a+b)·d_i
  = Σ_i cos_i·(c0·c + z0·d) + sin_i·(c0·d − z0·c). Returns [rows]."""
  e = c * c0 + d * z0
  f = d * c0 - c * z0
  return (cos_i * e + sin_i * f).sum(axis=1)


def e4m3_hi_lo(x: Array) -> tuple[Array, Array]:
  """x [..., R] f32 -> (codes [..., 2, R] float8_e4m3fn, scale [...] f32)
  with x ≈ scale·(hi + lo): hi the e4m3 rounding of x/scale (|x/scale| ≤
  448), lo that of the remainder. An fp8 wgmma per part then gives
  products with ~8 significant bits of x (bf16's), where one e4m3 rounding
  keeps 4. A row of zeros gets scale 1."""
  amax = jnp.max(jnp.abs(x), axis=-1)
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
  y = x / scale[..., None]
  hi = narrow_values(y, E4M3_CODE)     # (else lo = 0 on the GPU)
  lo = (y - hi.astype(jnp.float32)).astype(E4M3_CODE)
  return jnp.stack([hi, lo], axis=-2), scale


def softmax_step(m, l, blocks, *, column_max=lambda x: x.max(axis=0)):
  """One online-softmax update over the rows of a tile's score blocks
  (a sequence of [rows, N] f32 arrays): running max m [N] and sum l ->
  (m', l', rescale of the old accumulator [N], probabilities: one block
  per score block). The blocks are combined elementwise first, so a tile
  costs one cross-warp max (`column_max`) however many it has.

  l is [N] (summed over the rows every tile: a second cross-warp
  reduction) or [rows, N] (per-row partials, rescaled and added
  elementwise; the caller sums its rows once, at the end)."""
  top = functools.reduce(jnp.maximum, blocks)
  m_new = jnp.maximum(m, column_max(top))
  corr = jnp.exp(m - m_new)
  probs = tuple(jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
                for s in blocks)
  total = functools.reduce(jnp.add, probs)
  if l.ndim == 2:
    return (m_new, l * lax.broadcast_in_dim(corr, l.shape, [1]) + total,
            corr, probs)
  return m_new, l * corr + total.sum(axis=0), corr, probs


def int4_column_order(rank: int) -> np.ndarray:
  """The column permutation π of `_upcast_registers_as_wgmma`: column c of
  the array it returns holds column π(c) of the codes. Within each block
  of 32 columns, c = 8j + 2q + e -> 8q + 2j + e (j, q < 4, e < 2): a thread
  of the WGMMA_UPCAST_4X layout holds 8 consecutive columns 8q..8q+7 of
  the block, the wgmma layout's holds pairs 8j + 2q, +1. An involution."""
  c = np.arange(rank)
  block, j, q, e = c // 32, c % 32 // 8, c % 8 // 2, c % 2
  return 32 * block + 8 * q + 2 * j + e


def int4_fused_column_order(rank: int) -> np.ndarray:
  """The column permutation of `_dequant_int4_fused`: column c of the
  array it returns holds column π(c) of the codes. Within each block of 32
  columns, c = 8j + 2q + e -> 8q + j + 4e (j, q < 4, e < 2): a thread of
  the WGMMA_UPCAST_4X layout holds the 8 consecutive columns 8q..8q+7 of
  the block in one 32-bit register, and the routine's j-th pair is its
  codes j and j + 4 (one shift and mask each), read as the wgmma layout's
  pair 8j + 2q, +1. Not an involution: undo it with `np.argsort`."""
  c = np.arange(rank)
  block, j, q, e = c // 32, c % 32 // 8, c % 8 // 2, c % 2
  return 32 * block + 8 * q + j + 4 * e


def int8_key_column_order(rank: int) -> np.ndarray:
  """The column permutation of `_int4_codes_as_int8`: column c of the
  array it returns holds column π(c) of the codes. Within each block of 32
  columns, c = 16e + 4q + i -> 8q + 2i + e (e < 2, q < 4, i < 4): a thread
  of the WGMMA_UPCAST_4X layout holds codes 8q..8q+7 of the block in one
  32-bit register; its even codes (one mask) are the wgmma 8-bit layout's
  four columns 4q..4q+3 of the block's first 16, its odd codes (a shift
  and a mask) those of the second 16."""
  c = np.arange(rank)
  block, e, q, i = c // 32, c % 32 // 16, c % 16 // 4, c % 4
  return 32 * block + 8 * q + 2 * i + e
