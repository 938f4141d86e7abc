"""Shapes, configs and helpers shared by the latent decode kernels.

Notation (as in `palu_jax/typing.py`): B batch, S cache length, G head groups
(one latent per group), J KV heads per group, Q query heads per KV head,
N = G·J·Q query heads, H head dim, R latent rank per group.

A latent cache side (keys or values) is either a 16-bit array [B, S, G·R] or
a `QuantLatent` of packed per-token codes (layout of `palu_jax.quantize.
int_quant.pack`, re-implemented here so this package imports nothing above
it) with 16-bit scales and offsets per group of `quant_group` latents.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array


class QuantLatent(NamedTuple):
  """Packed latents of one cache side."""
  codes: Array   # [B, S, bits·⌈G·R/8⌉] uint8, or [B, S, G·R] float8_e4m3fn
  scale: Array   # [B, S, G·R / quant_group] bf16/fp16
  offset: Array  # [B, S, G·R / quant_group] ([B, S, 0] for fp8 codes)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LatentSpec:
  """Static description of one layer's latent attention.

  Attributes:
    groups: G, latent groups (one latent per group of KV heads).
    kv_per_group: J, KV heads per group (1: M-LRD, all: J-LRD).
    q_per_kv: Q, query heads per KV head (GQA).
    head_dim: H.
    k_rank / v_rank: latent ranks per group (equal with a shared latent).
    shared: one latent serves keys and values (read once).
    bits: 16 for a bf16/fp16 cache, 8 for float8 e4m3 codes, else 4/3/2
      for packed integer codes.
    quant_group: latents per scale/offset pair.
    k_up_bits: how the model stores B_k: 16 bits, or 8 (`--k-up-bits 8`):
      e4m3 values times a power-of-two scale per latent group and column,
      the B_k an fp8 key rebuild multiplies exactly.
  """
  groups: int
  kv_per_group: int
  q_per_kv: int
  head_dim: int
  k_rank: int
  v_rank: int
  shared: bool = False
  bits: int = 16
  quant_group: int = 32
  k_up_bits: int = 16

  @property
  def heads_per_group(self) -> int:
    return self.kv_per_group * self.q_per_kv

  @property
  def n_heads(self) -> int:
    return self.groups * self.heads_per_group

  def latent_bytes_per_token(self, scale_bytes: int = 2) -> int:
    """Cache bytes one token adds to this layer."""
    widths = [self.groups * self.k_rank]
    if not self.shared:
      widths.append(self.groups * self.v_rank)
    if self.bits == 16:
      return sum(2 * w for w in widths)
    if self.bits == 8:                 # fp8 codes + a scale per group
      return sum(w + scale_bytes * w // self.quant_group for w in widths)
    return sum(self.bits * -(-w // 8) + 2 * scale_bytes * w // self.quant_group
               for w in widths)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KernelConfig:
  """Launch parameters: cache positions per tile, sequence splits
  (flash-decoding split-K), Triton warps and pipeline stages; resident_b
  (RoPE path): hold the group's B_k on chip across the loop (True), re-read
  it per tile (False), or decide by its size (None)."""
  block_s: int = 64
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 2
  resident_b: bool | None = None


def f32(x: Array) -> Array:
  return x.astype(jnp.float32)


def rounded(x: Array, dtype) -> Array:
  """x (f32) rounded to `dtype`, kept in f32. (On the GPU, XLA may drop the
  rounding inside a larger computation: see `narrow_values`.)"""
  return x.astype(dtype).astype(jnp.float32)


def narrow_values(x: Array, dtype) -> Array:
  """x converted to `dtype` behind an optimization barrier: the values a
  later conversion back reads are the narrow ones. XLA:GPU's
  SimplifyFPConversions (run when excess precision is allowed, its
  default) rewrites a chain of float conversions A -> B -> A into A, so
  x.astype(e4m3).astype(f32) inside one jitted computation is x on the GPU
  (the CPU keeps the rounding): the fp8 fake quantization and the query's
  hi + lo split measured nothing there (NOTES.md, "fp8_scores, cause")."""
  return jax.lax.optimization_barrier(x.astype(dtype))


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def pow2_chunks(n: int, unit: int = 16) -> tuple[tuple[int, int], ...]:
  """(start, size) pieces of [0, n) with power-of-two sizes ≥ unit, largest
  first (Triton tiles must be powers of two); n must be a multiple of unit."""
  out, start = [], 0
  for bit in reversed(range(n.bit_length())):
    size = 1 << bit
    if size >= unit and n - start >= size:
      out.append((start, size))
      start += size
  assert start == n, (n, unit)
  return tuple(out)


# ---------------------------------------------------------------- references

def unpack_codes(codes: Array, bits: int, n: int) -> Array:
  """Packed bytes [..., W] -> codes [..., n] (int32), with plain jnp bit
  arithmetic on the byte index of each code."""
  idx = jnp.arange(n)
  c = codes.astype(jnp.int32)
  if bits == 4:
    return (c[..., idx // 2] >> (4 * (idx % 2))) & 15
  low = (c[..., idx // 4] >> (2 * (idx % 4))) & 3
  if bits == 2:
    return low
  plane = codes.shape[-1] * 2 // 3          # start of the high-bit plane
  return low | (((c[..., plane + idx // 8] >> (idx % 8)) & 1) << 2)


def dequantize_side(side, spec: LatentSpec, width: int, dtype) -> Array:
  """A cache side as values [B, S, width] in `dtype` (f32 arithmetic)."""
  if not isinstance(side, QuantLatent):
    return side.astype(dtype)
  g = spec.quant_group
  scale = jnp.repeat(side.scale.astype(jnp.float32), g, axis=-1)
  if spec.bits == 8:                  # float8 e4m3 codes, no offset
    return (side.codes.astype(jnp.float32) * scale).astype(dtype)
  q = unpack_codes(side.codes, spec.bits, width).astype(jnp.float32)
  offset = jnp.repeat(side.offset.astype(jnp.float32), g, axis=-1)
  return (q * scale + offset).astype(dtype)


def rebuilt_keys(hk_v: Array, k_up: Array, k_bias: Array | None,
                 spec: LatentSpec, dtype) -> Array:
  """Every cached key, K = h_k·B_k (+ b_k), unrotated: [B, S, G, J, H] f32
  holding `dtype` values, rounded where the model's jnp path rounds (after
  the product and after the bias).

  f32 operands give the exact products of the 16-bit values with f32 sums
  (what the tensor cores do; XLA:CPU has no bf16 x bf16 -> f32 dot).
  """
  g, j, h = spec.groups, spec.kv_per_group, spec.head_dim
  batch, s, _ = hk_v.shape
  keys = rounded(jnp.einsum("BSGR,GRC->BSGC",
                            f32(hk_v).reshape(batch, s, g, spec.k_rank),
                            f32(k_up).reshape(g, spec.k_rank, j * h)), dtype)
  if k_bias is not None:
    keys = rounded(keys + f32(k_bias.astype(dtype)).reshape(g, j * h), dtype)
  return keys.reshape(batch, s, g, j, h)


def attend_latents(q: Array, keys: Array, hk_v: Array, hv, lengths: Array,
                   spec: LatentSpec) -> Array:
  """Reference attention of q [B, N, H] over keys [B, S, G, J, H] (in q's
  dtype) mixing value latents -> [B, N, R_v] f32 (scores in f32)."""
  batch, s = keys.shape[:2]
  h = spec.head_dim
  qg = q.reshape(batch, spec.groups, spec.kv_per_group, spec.q_per_kv, h)
  scores = jnp.einsum("BGJQH,BSGJH->BGJQS", f32(qg), f32(keys)) * h ** -0.5
  scores = scores.reshape(batch, spec.groups, spec.heads_per_group, s)
  out = masked_softmax_mix(scores, lengths,
                           value_latents(hk_v, hv, spec, q.dtype))
  return out.reshape(batch, spec.n_heads, spec.v_rank)


def value_latents(hk_v: Array, hv, spec: LatentSpec, dtype) -> Array:
  """Value latents [B, G, S, R_v] (the key latents with a shared latent)."""
  if spec.shared:
    v = hk_v
  else:
    v = dequantize_side(hv, spec, spec.groups * spec.v_rank, dtype)
  batch, s, _ = v.shape
  return v.reshape(batch, s, spec.groups, spec.v_rank).transpose(0, 2, 1, 3)


# shared memory a CTA may opt in to on sm_90 (232,448 bytes); Ampere has
# less (164 KB on the A100)
SMEM_BYTES = 227 * 1024

E4M3_CODE = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def pow2_scale(amax: Array, dtype, code_max: float = E4M3_MAX) -> Array:
  """The power of two at or above amax / code_max (the code's largest
  finite value: e4m3's 448 by default, 127 for int8), within `dtype`'s
  normal range (1 where amax is 0): a scale under which no code saturates
  and code·scale is exact."""
  info = jnp.finfo(dtype)
  f32 = jnp.float32
  # exact in integer arithmetic: XLA:GPU's exp2 and log2 are approximate
  # (an exp2 scale was 2^k·(1 - 2^-24) on the H200), and with its bf16
  # rounding folded away the jitted fake quantization then differed from
  # the stored codes by an ulp. amax = mant·2^exp, mant in [0.5, 1), and
  # with code_max = c·2^k (c in [0.5, 1)): amax/code_max <= 2^e  <=>
  # mant <= c·2^(e + k - exp) (448 = 0.875·2^9, 127 = (127/128)·2^7).
  c, k = math.frexp(code_max)
  mant, exp = jnp.frexp(jnp.minimum(jnp.asarray(amax, f32), jnp.finfo(f32).max))
  e = exp - k + (mant > c).astype(exp.dtype)
  e = jnp.clip(e, info.minexp, info.maxexp - 1)
  power = lax.bitcast_convert_type((e + 127).astype(jnp.int32) << 23, f32)
  return jnp.where(amax > 0, power, 1.0).astype(dtype)


def cache_sides(hk, hv, spec: LatentSpec) -> tuple[tuple, tuple]:
  """Cache arrays of each side as the kernel takes them (no value side with
  a shared latent; float8 codes have no offset array)."""
  def as_tuple(x):
    if not isinstance(x, QuantLatent):
      return (x,)
    return (x.codes, x.scale) if spec.bits == 8 else tuple(x)
  return as_tuple(hk), (() if spec.shared else as_tuple(hv))


def masked_softmax_mix(scores: Array, lengths: Array, values: Array) -> Array:
  """softmax over keys s < lengths[b] of scores [B, G, M, S] (f32), mixing
  values [B, G, S, R] -> [B, G, M, R] f32; a sequence of length 0 gives 0."""
  s = scores.shape[-1]
  valid = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
  scores = jnp.where(valid, scores, -jnp.inf)
  top = jnp.max(scores, -1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(valid, jnp.exp(scores - top), 0.0)
  denom = jnp.sum(p, -1, keepdims=True)
  mixed = jnp.einsum("BGMS,BGSR->BGMR", p, values.astype(jnp.float32))
  return mixed / jnp.where(denom > 0, denom, 1.0)


# ------------------------------------------------------------ kernel helpers

def interleave(fields: list) -> Array:
  """[x_0 .. x_{F-1}] each [M, W] -> [M, W·F] with column F·i + f = x_f[:, i].

  Built from pairwise joins (`stack` on a new last axis) and reshapes, the
  only interleave the Triton backend lowers.
  """
  if len(fields) == 1:
    return fields[0]
  even, odd = interleave(fields[0::2]), interleave(fields[1::2])
  pair = jnp.stack([even, odd], axis=-1)
  return pair.reshape(pair.shape[0], pair.shape[1] * 2)


def fields_per_byte(bits: int) -> int:
  """Codes per byte of the packed layout (3-bit: its 2-bit low plane)."""
  return {16: 1, 8: 1, 4: 2, 3: 4, 2: 4}[bits]


def piece_layout(spec: LatentSpec, rank: int) -> tuple[tuple[int, int, int],
                                                       ...]:
  """How the kernel splits a group's `rank` latents into register tiles:
  (start, size, stride) per piece, latents start + stride·i, i < size.

  16-bit latents come in power-of-two chunks. Packed codes come as byte
  fields: the f-th field of a chunk's bytes holds latents c0 + F·i + f, so
  each field is decoded with one shift and mask and used as it is (the
  matching rows of B_k, columns of q' and of the output are read strided),
  with no interleaving in registers.
  """
  per = fields_per_byte(spec.bits)
  return tuple((c0 + f, c // per, per) for c0, c in pow2_chunks(rank, rank_unit(spec))
               for f in range(per))


def rank_unit(spec: LatentSpec) -> int:
  """Ranks must be multiples of this: pieces are ≥ 16 wide (the smallest
  tensor-core dot) and quant groups never straddle two chunks."""
  if spec.bits == 16:
    return 16
  return max(16 * fields_per_byte(spec.bits), spec.quant_group)


# dtype -> (bit pattern of 2^m, 2^m) where the float's last mantissa bit is
# 1: OR-ing a small integer c into the pattern gives the float 2^m + c
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0),
          jnp.dtype(jnp.float16): (0x6400, 1024.0),
          jnp.dtype(jnp.float32): (0x4B000000, 8388608.0)}


def codes_as_float(c: Array, dtype) -> Array:
  """Small non-negative int32 codes -> the same values in `dtype`, by bit
  tricks (OR into the mantissa of 2^m, subtract 2^m: exact) instead of an
  integer-to-float conversion, which runs at a quarter of the ALU rate
  (on the H100 the quantized kernels' throughput did not change with it:
  something else binds them)."""
  dtype = jnp.dtype(dtype)
  pattern, base = _MAGIC[dtype]
  uint = jnp.uint32 if dtype.itemsize == 4 else jnp.uint16
  as_float = jax.lax.bitcast_convert_type((c | pattern).astype(uint), dtype)
  return as_float - jnp.asarray(base, dtype)


def repeat_columns(x: Array, times: int) -> Array:
  """x [M, W] -> [M, W·times], column i = x[:, i // times].

  A broadcast and a reshape: repeating by self-joins (`interleave`) instead
  gave wrong columns on the GPU (Triton 3.6, measured), though it passes in
  interpret mode."""
  m, w = x.shape
  return jnp.broadcast_to(x[:, :, None], (m, w, times)).reshape(m, w * times)


def load_latent_pieces(side_refs, b, rows, group_col, rank: int,
                       spec: LatentSpec, row_width: int, block: int, dtype
                       ) -> list:
  """The latents of one group (columns group_col.. of the cache row) at
  `rows` of sequence b, dequantized in registers: one [block, size] tile
  per piece of `piece_layout(spec, rank)`, in that order.

  Codes become floats by bit tricks (`codes_as_float`), and scales and
  offsets are widened to their latents' columns; the affine
  map c·scale + offset is done in `dtype`.
  """
  pieces = piece_layout(spec, rank)
  if spec.bits == 16:
    (h_ref,) = side_refs
    return [h_ref[b, rows, pl.ds(group_col + c0, size)].astype(dtype)
            for c0, size, _ in pieces]
  codes_ref, scale_ref = side_refs[:2]
  g = spec.quant_group
  if spec.bits == 8:
    # float8 e4m3 codes times a power-of-two scale: exact in bf16/fp16/f32,
    # so the product equals the reference's f32 dequantization, rounded
    out = []
    for c0, size, _ in pieces:
      col = group_col + c0
      scale = repeat_columns(
          scale_ref[b, rows, pl.ds(col // g, size // g)].astype(dtype), g)
      out.append(codes_ref[b, rows, pl.ds(col, size)].astype(dtype) * scale)
    return out
  offset_ref = side_refs[2]
  per = fields_per_byte(spec.bits)
  width = 2 if spec.bits == 3 else spec.bits
  out = []
  for k in range(0, len(pieces), per):
    c0, size = pieces[k][0], pieces[k][1] * per           # the chunk
    col = group_col + c0
    v = codes_ref[b, rows, pl.ds(col // per, size // per)].astype(jnp.int32)
    fields = [(v >> (width * f)) & (2 ** width - 1) for f in range(per)]
    if spec.bits == 3:
      plane = 2 * -(-row_width // 8)
      hi = codes_ref[b, rows, pl.ds(plane + col // 8, size // 8)].astype(
          jnp.int32)
      hi = interleave([hi, hi])                 # column i: byte i // 2
      # a traced iota: a constant array would become a kernel-body constant
      odd = jax.lax.broadcasted_iota(jnp.int32, (1, size // 4), 1) % 2 * 4
      fields = [lo | (((hi >> (odd + f)) & 1) << 2)
                for f, lo in enumerate(fields)]
    groups = size // g
    # field column i is latent c0 + per·i + f, of quant group i·per // g
    scale = repeat_columns(
        scale_ref[b, rows, pl.ds(col // g, groups)].astype(dtype), g // per)
    offset = repeat_columns(
        offset_ref[b, rows, pl.ds(col // g, groups)].astype(dtype), g // per)
    out += [codes_as_float(q, dtype) * scale + offset for q in fields]
  return out


def split_hi_lo(x: Array, dtype) -> tuple[Array, Array | None]:
  """x (f32) as hi + lo, both in the 16-bit `dtype`: hi = x rounded, lo the
  rounded remainder (None for a float32 dtype: hi is x). Two tensor-core
  dots with hi and lo give x·h to about 16 mantissa bits instead of 8
  (bf16), so the attention mix does not hinge on where each probability
  rounds."""
  hi = x.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return hi, None
  return hi, (x - hi.astype(jnp.float32)).astype(dtype)


# Up to this many split-K partials are merged by explicit slices (below),
# and up to UNROLLED_COMBINE_MAX_PARTS where all partials together hold at
# most UNROLLED_COMBINE_ELEMENTS values. Measured on the H200, batch 1, span
# (NOTES v22 and v25): 32 partials of 2K outputs (Llama-3-8B M-LRD) merge
# 1.6-4 µs faster unrolled than as reductions, 32 partials of 8K outputs
# (G-LRD-4) 1.3-5.3 µs slower, 132 partials 7 µs slower.
UNROLLED_COMBINE_PARTS = 16
UNROLLED_COMBINE_MAX_PARTS = 32
UNROLLED_COMBINE_ELEMENTS = 1 << 17


def unrolled_combine(parts: int, elements: int) -> bool:
  """Whether `combine_splits` merges `parts` partials holding `elements`
  values in all (acc's size) by explicit slices rather than reductions."""
  return parts <= UNROLLED_COMBINE_PARTS or (
      parts <= UNROLLED_COMBINE_MAX_PARTS
      and elements <= UNROLLED_COMBINE_ELEMENTS)


def split_weights(ms: list, ls: list) -> tuple[list, Array]:
  """Per split-K partial its running max m_p and sum l_p (each [..., M])
  -> the partials' weights exp(m_p − max_p m_p) and the merged sum
  Σ_p w_p·l_p, in partial order. Written with elementwise ops only, so it
  also runs inside a Mosaic GPU kernel on loaded arrays (`merge_in_kernel`)."""
  top = ms[0]
  for mp in ms[1:]:
    top = jnp.maximum(top, mp)
  ws = [jnp.exp(mp - top) for mp in ms]
  denom = ws[0] * ls[0]
  for wp, lp in zip(ws[1:], ls[1:]):
    denom = denom + wp * lp
  return ws, denom


def combine_splits(acc: Array, m: Array, l: Array, *,
                   rows_first: bool = False) -> Array:
  """Merges split-K partials: acc [..., P, M, R] (unnormalized), m/l
  [..., P, M] (running max and sum) -> [..., M, R] f32. rows_first: acc is
  [..., P, R, M], as the Mosaic GPU kernel stores its accumulators; the
  merge runs in that layout and transposes only the merged [..., R, M]
  (on the H200 XLA still emits the transpose as a kernel of its own: the
  same time as transposing all P partials first, NOTES.md v23).

  With few partials (`unrolled_combine`) the merge is written as
  elementwise ops over the P slices: XLA:GPU then emits it as one loop
  fusion, with whatever consumes it, instead of three kernels (the max and
  exp, the sum of weights, the weighted sum), two launches fewer per
  decode layer."""
  parts = m.shape[-2]
  # a weight per (partial, head) broadcast over the value rows
  spread = (lambda w: w[..., None, :]) if rows_first else (
      lambda w: w[..., None])
  if not unrolled_combine(parts, acc.size):
    top = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - top)                                   # [..., P, M]
    denom = jnp.sum(w * l, axis=-2)                        # [..., M]
    out = jnp.sum(spread(w) * acc, axis=-3)
  else:
    ws, denom = split_weights([m[..., p, :] for p in range(parts)],
                              [l[..., p, :] for p in range(parts)])
    out = spread(ws[0]) * acc[..., 0, :, :]
    for p in range(1, parts):
      out = out + spread(ws[p]) * acc[..., p, :, :]
  out = out / spread(jnp.where(denom > 0, denom, 1.0))
  return jnp.swapaxes(out, -1, -2) if rows_first else out


def dot(a: Array, b: Array, trans_b: bool = False) -> Array:
  """a [M, K] · b [K, N] (or b [N, K] with trans_b) with f32 results: on
  tensor cores for 16-bit operands, exact IEEE products for f32 ones (not
  TF32)."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  if jax.default_backend() != "gpu":
    # interpret mode: the CPU runtime has no bf16 x bf16 -> f32 dot; f32
    # operands give the same products (exact) and the same f32 accumulation
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
