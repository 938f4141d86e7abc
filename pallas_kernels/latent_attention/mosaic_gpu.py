"""Latent decode attention on Hopper: Pallas's Mosaic GPU backend (wgmma, TMA).

One kernel serves both paths (`rope=True`: keys rebuilt and rotated in the
kernel, or with `rope_mode="fold"` the query folded into B_k, see
`folded_scores`; `rope=False`: B_k folded into the query). Per CTA, one
memory warpgroup and `compute_wgs` (2, or 3) compute warpgroups:

  memory WG   TMA producer: the loop invariants once (B_k or the absorbed
              query, queries, RoPE frequencies, key bias), then the latent
              tiles into two rings of `stages` shared-memory slots, keys
              (h_k [bs, R_k] and the tile's cos/sin rows) and values (h_v
              [bs, R_v]), each slot guarded by a produced and a consumed
              barrier. A key slot is released as soon as its tile's last
              rebuild has read it, a value slot at the tile's end, and keys
              are loaded one tile ahead of values.
  compute WGs W of them, taking tiles in turn (WG w: tiles w, w+W, …),
              each with its own online softmax; they write separate partials,
              so the tensor core is kept busy by one WG while the other does
              its elementwise work. Their softmax reductions take turns (a
              ring of W barriers): Pallas lowers a cross-warp reduction through
              one scratch buffer per kernel, which two WGs reducing at once
              would race on (seen on the H200: wrong sums, 1-60 % of outputs).

A tile is bs = 64 or 128 positions (`choose_config`: 128 where two ring
slots of it fit). Per sub-tile of 64 positions, with positions as wgmma
rows (M = 64) and the few query heads as columns (N = 8·⌈Q/8⌉), so no
tensor-core work is spent on padding rows:
  RoPE:    K = h_k·B_k                        (one wgmma, N = H, f32)
           round to float16 once, rotate the halves by the angles
           (s0 + i)·θ in packed f16 registers  (`rotation_dtype`)
           Sᵀ = K_rot·qᵀ                       (wgmma, A from registers)
  no RoPE: Sᵀ = h_k·q'ᵀ                       (wgmma, q' = q·B_kᵀ/√H)
Low-bit caches: float8 codes (a scale per token and group; with RoPE an
fp8 rebuild, without it e4m3 scores or f16 upcasts), and 4-bit codes
(`dequant4`: turned into 16-bit latents in registers with each quant
group's scale and offset, or one per token with quant_group = the rank;
with RoPE the keys are rebuilt from them);
their values are staged in each compute WG's 16-bit tile.
And per tile (one update for all its sub-tiles):
           m, l, P = online softmax over the bs rows (f32)
           Pᵀ → shared memory (bf16/fp16), acc += h_vᵀ·P  (wgmma, [R_v, N],
           K = bs)

The rotation angle of row i of a sub-tile starting at s0 is s0·θ + i·θ:
cos/sin of i·θ are computed once per WG, those of s0·θ per sub-tile on one
row vector (an XLA table), and the two are combined by the angle-sum
identities.

Grid: (X, P, B) with X = G·J KV heads (RoPE: one CTA per KV head, so its B_k
slice stays resident) or G groups (no RoPE), P sequence splits. The 2·P
partials per program are merged by `common.combine_splits` in XLA.

This module holds the kernel body (`_kernel`) and its host side
(`latent_attention`: operands, scratch, launch, merge). The launch
configuration and the rule that picks it are in `_mosaic_config`, the
plain tile math in `_mosaic_tile_math`, the register routines in
`_mosaic_registers`; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.absorb_attention import absorbed_queries
from pallas_kernels.common import (E4M3_CODE, E4M3_MAX, SMEM_BYTES, Array,
                                   LatentSpec, cache_sides, combine_splits,
                                   pow2_scale, split_weights)
# The launch configuration and its rule, the tile math and the register
# routines live in their own modules; their names are this module's too
# (callers and tests reach them as `mosaic_gpu.X`).
from pallas_kernels.latent_attention._mosaic_config import (  # noqa: F401
    _CONVERTER_REGISTERS, _PRODUCER_REGISTERS, COMPUTE_WGS,
    MERGE_IN_KERNEL_PARTS, MERGE_WGS_SPLITS,
    PROFILE_BYTES_PER_RANGE, SUB, VALUE_RING_PER_WG, MosaicConfig,
    _compute_registers, _swizzle, choose_config, converter_wgs,
    fp8_scores, fused_heads, fused_int4, heads_per_cta, int4_converter,
    int4_scores_together, int4_token_scales, int8_rebuild, launch_registers,
    merge_in_kernel_refused, permuted_int4, profile_smem_bytes, query_cols,
    raw_int4_keys, raw_int4_values, rebuild_early, reduction_scratch_elems,
    scores_dtype, smem_bytes, split_spans, stored_parts, unsupported_reason,
    value_halves, value_row_chunks, value_tile_cols, value_windows,
    values_during_scores)
from pallas_kernels.latent_attention._mosaic_registers import (  # noqa: F401
    INT4_MAGIC, _dequant_int4_fused, _flip_code_top_bits,
    _int4_codes_as_int8, _reduce_rows, _upcast_registers_as_wgmma,
    mlir_type)
from pallas_kernels.latent_attention._mosaic_tile_math import (  # noqa: F401
    angle_sum, e4m3_hi_lo, folded_scores, int4_column_order,
    int4_fused_column_order, int8_key_column_order, rotate_halves,
    softmax_step)

_FLOOR = -1e30           # finite "minus infinity": masked rows never give NaN


def _set_registers(n: int, wgs: int):
  """setmaxnreg to `n` a thread from the launch's count (an increase or a
  decrease: setmaxnreg.inc below the current count is undefined)."""
  launch = launch_registers(wgs)
  if n != launch:
    plgpu.set_max_registers(n, action="increase" if n > launch
                            else "decrease")


def _transforms(swizzle: int, itemsize: int = 2):
  return (plgpu.TilingTransform((8, swizzle // itemsize)),
          plgpu.SwizzleTransform(swizzle))


def block_diagonal_queries(qh: Array) -> Array:
  """Queries per KV head [B, X, heads, nq, H] -> [B, X, heads·nq,
  heads·H]: head a's rows a·nq.. hold its queries in columns a·H.., zeros
  elsewhere. Keys of all heads side by side [rows, heads·H] times its
  transpose give every head's scores side by side [rows, heads·nq] in one
  product."""
  b, x, heads, nq, h = qh.shape
  eye = jnp.eye(heads, dtype=qh.dtype)
  bd = jnp.einsum("bxanh,ac->bxanch", qh, eye)
  return bd.reshape(b, x, heads * nq, heads * h)


def int4_order(spec: LatentSpec, config: MosaicConfig, rank: int
               ) -> np.ndarray | None:
  """The column order the int4 path's registers hold (None: natural)."""
  if fused_int4(spec, config):
    return int4_fused_column_order(rank)
  if permuted_int4(spec, config):
    return int4_column_order(rank)
  return None


def _kernel(lengths_g, hk_g, hv_g, *rest, spec: LatentSpec, rope: bool,
            config: MosaicConfig, span: int, nq: int, dtype, has_bias: bool,
            splits: int, x_size: int):
  fold = rope and config.rope_mode == "fold"
  converters = converter_wgs(spec, rope, config)
  converter = converters > 0
  i8 = int8_rebuild(spec, rope, config)   # int4 RoPE keys: an int8 rebuild
  if i8 and config.int4_int8_keys_smem:
    *rest, k8_s = rest     # [compute WGs, SUB, R_k] int8: each WG's keys
  if config.merge_wgs:     # WG w + 1's partial stored for WG w
    *rest, merge_bar = rest
  if converter:            # value ring slots: dequantized / free again
    *rest, vready_bar, vfree_bar = rest
  *rest, red_s = rest      # [compute WGs, elems] f32: private reductions
  if fold:
    (u_g, vec_g, base_g, acc_o, m_o, l_o, u_s, vec_s, base_s, hk_s, hv_s,
     p_s, setup_bar, kprod_bar, vprod_bar, kcons_bar, vcons_bar,
     turn_bar) = rest
  elif rope and spec.bits == 8:
    (bk_g, q_g, vec_g, base_g, sk_g, sv_g, acc_o, m_o, l_o, b_s, q_s, vec_s,
     base_s, hk_s, hv_s, sk_s, sv_s, vb_s, p_s, setup_bar, kprod_bar,
     vprod_bar, kcons_bar, vcons_bar, turn_bar) = rest
  elif rope and spec.bits == 4:
    (bk_g, q_g, vec_g, base_g, sk_g, zk_g, sv_g, zv_g, acc_o, m_o, l_o, b_s,
     q_s, vec_s, base_s, hk_s, hv_s, sk_s, zk_s, sv_s, zv_s, vb_s, p_s,
     setup_bar, kprod_bar, vprod_bar, kcons_bar, vcons_bar, turn_bar) = rest
  elif rope:
    (bk_g, q_g, vec_g, base_g, acc_o, m_o, l_o, b_s, q_s, vec_s, base_s,
     hk_s, hv_s, p_s, setup_bar, kprod_bar, vprod_bar,
     kcons_bar, vcons_bar, turn_bar) = rest
  elif spec.bits == 8 and fp8_scores(spec, rope, config):
    (qf_g, qs_g, sk_g, sv_g, acc_o, m_o, l_o, qf_s, qs_s, hk_s, hv_s, sk_s,
     sv_s, vb_s, p_s, setup_bar, kprod_bar, vprod_bar, kcons_bar, vcons_bar,
     turn_bar) = rest
  elif spec.bits == 8:
    (qf_g, sk_g, sv_g, acc_o, m_o, l_o, qf_s, hk_s, hv_s, sk_s, sv_s, vb_s,
     p_s, setup_bar, kprod_bar, vprod_bar, kcons_bar, vcons_bar,
     turn_bar) = rest
  elif spec.bits == 4 and raw_int4_keys(spec, rope, config):
    (qf_g, qs_g, sk_g, zk_g, sv_g, zv_g, acc_o, m_o, l_o, qf_s, qs_s, hk_s,
     hv_s, sk_s, zk_s, sv_s, zv_s, vb_s, p_s, setup_bar, kprod_bar,
     vprod_bar, kcons_bar, vcons_bar, turn_bar) = rest
  elif spec.bits == 4:
    (qf_g, sk_g, zk_g, sv_g, zv_g, acc_o, m_o, l_o, qf_s, hk_s, hv_s, sk_s,
     zk_s, sv_s, zv_s, vb_s, p_s, setup_bar, kprod_bar, vprod_bar, kcons_bar,
     vcons_bar, turn_bar) = rest
  else:
    (qf_g, acc_o, m_o, l_o, qf_s, hk_s, hv_s, p_s, setup_bar, kprod_bar,
     vprod_bar, kcons_bar, vcons_bar, turn_bar) = rest
  # a key slot is free once its tile's first wgmma has read it; with a
  # shared latent the same slot still holds the values
  split_rings = not spec.shared
  # float8 codes: keys rebuilt by an fp8 wgmma (RoPE) or upcast to f16 in
  # registers (no RoPE); the values go to the WG's f16 tile `vb_s` (masked
  # past the length) for p·h_v, so a key slot frees with its keys
  fp8 = spec.bits == 8
  # 4-bit codes: each ring is one buffer seen as bytes (the TMA's view) and
  # as int4 codes (the compute WGs' view)
  int4 = spec.bits == 4
  hk_tma, hv_tma = hk_s, hv_s
  if int4:                  # (a shared latent has no value ring)
    hk_tma, hk_s = hk_s
    if not spec.shared:
      hv_tma, hv_s = hv_s
  # values staged in the WG's 16-bit tile `vb_s` (float8, int4)
  staged = fp8 or int4
  native = fp8_scores(spec, rope, config)
  raw = raw_int4_keys(spec, rope, config)
  raw_v = raw_int4_values(spec, rope, config)   # (values likewise)
  together = int4_scores_together(spec, rope, config)
  # without RoPE: a tile's values staged while its last score wgmma runs
  early = values_during_scores(spec, rope, config)
  fused = fused_heads(spec, rope, config)
  if native:      # latents per score wgmma: one swizzle row (≤ 128)
    k_step = (_swizzle(spec.k_rank, 1) if config.fp8_promote
              else spec.k_rank)
  bs, stages = config.block_s, config.stages
  subs = bs // SUB
  q_dtype = scores_dtype(config, dtype)
  rk, rv = spec.k_rank, spec.v_rank
  hc = heads_per_cta(rope, config)
  cols = hc * nq               # query columns of the CTA: nq per KV head
  # float8 values in two column windows of R_v through a narrower tile
  halves = value_halves(spec, rope, config)
  # the p·h_v accumulators' latent rows (offset, rows) and where each reads
  # its values in the value tile (with halves: a window, from column 0)
  chunks = (value_windows(rv) if halves else value_row_chunks(rv))
  tile_chunks = tuple((0, w) for _, w in chunks) if halves else chunks
  j_per = spec.kv_per_group // hc if rope else 1   # CTAs per latent group
  x, p, b = lax.axis_index("x"), lax.axis_index("p"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  g = x // j_per
  length = lengths_g[b]
  start = p * span
  n_tiles = jnp.clip(pl.cdiv(length - start, bs), 0, span // bs)
  wgmma_layout = plgpu.Layout.WGMMA
  col_layout = plgpu.Layout.WGMMA.reduce(0)    # one value per column
  row_layout = plgpu.Layout.WGMMA.reduce(1)    # one value per row
  token_scaled = int4_token_scales(spec)      # int4: scales per token
  # values' rows past the length cleared in the last tile only (int4 and,
  # with fp8_mask_last, float8), not in every tile's conversion
  mask_last = ((int4 and config.int4_mask_last)
               or (fp8 and config.fp8_mask_last))

  def upcast(ref, rows_from, mask=True):
    """float8 codes [SUB, R] in shared memory -> f16 [SUB, R] (exact), in
    the wgmma layout; with `mask`, rows at or past the length zeroed
    (codes there may be anything, and 0·NaN is NaN on the tensor core)."""
    v = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
    v = plgpu.layout_cast(v.astype(jnp.float16), wgmma_layout)
    if not mask:
      return v
    row = rows_from + plgpu.broadcasted_iota(jnp.int32, v.shape, 0,
                                             layout=wgmma_layout)
    return jnp.where(row < length, v, jnp.zeros_like(v))

  def dequant4(codes, scale, offset, rows_from, mask):
    """4-bit codes [SUB, R] in shared memory (unsigned nibbles read as
    int4) -> latents [SUB, R] in `dtype`, in the wgmma layout: c·scale +
    offset per quant group of columns (scale, offset: [SUB, R/qg] refs,
    or [SUB] with one per token: `int4_token_scales`);
    with `mask`, rows at or past the length zeroed (their codes and scales
    may be anything, and 0·NaN is NaN on the tensor core)."""
    qg = spec.quant_group
    groups = range(codes.shape[1] // qg)

    def per_row(ref, n, dt=jnp.float32):  # quant group n's column, per row
      if token_scaled:     # one per token: the ref is a contiguous [SUB] row
        return plgpu.load(ref, (), layout=row_layout).astype(dt)
      return plgpu.load(ref.at[:, n], layout=row_layout,
                        optimized=False).astype(dt)

    if fused_int4(spec, config):
      with jax.named_scope("convert"):
        v = _dequant_int4_fused(
            plgpu.load(codes, layout=plgpu.Layout.WGMMA_UPCAST_4X),
            [per_row(scale, n, dtype) for n in groups],
            [per_row(offset, n, dtype) for n in groups], dtype)
    else:
      flip = config.int4_flip
      with jax.named_scope("convert"):
        c = plgpu.load(codes, layout=plgpu.Layout.WGMMA_UPCAST_4X)
        if flip:
          c = _flip_code_top_bits(c)
        # int4 -> 16 bits by Mosaic GPU's register conversion (prmt/lop3, no
        # conversion-pipe instruction); it reads the nibbles as signed:
        # codes 8..15 come out as -8..-1, or (flipped) every code as c - 8
        if permuted_int4(spec, config):  # 8 codes per register, in place
          c = _upcast_registers_as_wgmma(c.astype(dtype))
        else:
          c = plgpu.layout_cast(c, wgmma_layout).astype(dtype)
        if not flip:
          c = jnp.where(c < 0, c + 16, c)

      def scaled(n):
        sc, off = per_row(scale, n), per_row(offset, n)
        if flip:                 # c·s + z = (c - 8)·s + (z + 8·s)
          off = off + 8 * sc
        widen = lambda x: lax.broadcast_in_dim(x.astype(dtype), (SUB, qg),
                                               [0])
        return c[:, n * qg:(n + 1) * qg] * widen(sc) + widen(off)
      with jax.named_scope("scale"):
        v = jnp.concatenate([scaled(n) for n in groups], axis=1)
    if not mask:
      return v
    row = rows_from + plgpu.broadcasted_iota(jnp.int32, v.shape, 0,
                                             layout=wgmma_layout)
    return jnp.where(row < length, v, jnp.zeros_like(v))

  def values_to_tile(slot, s0, tile, mask, store_scope=None, window=None):
    """Value ring slot `slot`'s codes -> 16-bit values in `tile` [bs, R_v]:
    float8 upcast, int4 dequantized (rows past the length zeroed with
    `mask`). store_scope: a profiler stage name for the stores. window
    (`value_halves`): the (first column, width) of the float8 codes that
    fill the tile [bs, width]."""
    for j in range(subs):
      rows = pl.ds(j * SUB, SUB)
      if raw_v:     # c - 8; the scales and offsets go with P
        v = _dequant_int4_fused(
            plgpu.load(hv_s.at[slot, rows],
                       layout=plgpu.Layout.WGMMA_UPCAST_4X), [], [], dtype,
            centered=True)
      elif int4:
        v = dequant4(hv_s.at[slot, rows], sv_s.at[slot, rows],
                     zv_s.at[slot, rows], s0 + j * SUB, mask)
      else:
        codes = (hv_s.at[slot, rows] if window is None
                 else hv_s.at[slot, rows, pl.ds(*window)])
        v = upcast(codes, s0 + j * SUB, mask)
      with (jax.named_scope(store_scope) if store_scope
            else contextlib.nullcontext()):
        tile.at[rows][...] = v

  def token_scales(ref):
    """A sub-tile's float8 scales [SUB] (one per token) as f32 rows."""
    return plgpu.load(ref, (), layout=row_layout).astype(jnp.float32)

  n_wgs = config.compute_wgs
  all_wgs = n_wgs + 1 + converters      # compute, producer, converters
  private = config.private_reductions

  def load_stored(ref, part, layout, *rows):
    """Split partial `part` of program (b, x) as stored in `ref` (acc_o,
    m_o or l_o; `rows`: a slice of acc's latent rows), loaded in `layout`
    from global memory (L1/L2: Mosaic GPU's plain, not its smem-optimized,
    transfers)."""
    return plgpu.load(ref.at[(b, x, part) + rows], layout=layout,
                      optimized=False)

  def merge_parts(part):
    """merge_in_kernel: the partials of program (b, x) merged by its last
    WG into acc_o[b, x, parts] [R_v, cols] (normalized)."""
    parts = stored_parts(config, splits)
    done = pl.get_global(plgpu.SemaphoreType.REGULAR(
        (lengths_g.shape[0] * x_size,)))
    slot = done.at[b * x_size + x]
    last = part == parts - 1

    @pl.when(jnp.logical_not(last))
    def _():    # after this WG's stores (the signal releases them)
      plgpu.semaphore_signal(slot, 1, memory_scope="gpu")

    @pl.when(last)
    def _():
      plgpu.semaphore_wait(slot, parts - 1, decrement=False,
                           memory_scope="gpu")
      # every m and l first (loads in flight together), then the weights
      ws, denom = split_weights(
          [load_stored(m_o, q, col_layout) for q in range(parts)],
          [load_stored(l_o, q, col_layout) for q in range(parts)])
      inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
      for off, size in chunks:
        spread = lambda w, size=size: lax.broadcast_in_dim(
            w, (size, cols), [1])
        out = None
        for q in range(parts):
          a = load_stored(acc_o, q, wgmma_layout, pl.ds(off, size))
          out = spread(ws[q]) * a if out is None else out + spread(ws[q]) * a
        acc_o[b, x, parts, pl.ds(off, size)] = out * spread(inv)

  @pl.when(wg < n_wgs)
  def _compute():
    # the launch's registers split: producer 24 per thread, the rest to
    # the compute WGs (240 with 2 WGs, 160 with 3), in multiples of 8
    _set_registers(_compute_registers(n_wgs, converters), all_wgs)
    plgpu.barrier_wait(setup_bar.at[0])
    if native:
      q_scale = plgpu.load(qs_s, (), layout=col_layout)
    if raw:
      q_sum = lax.broadcast_in_dim(plgpu.load(
          qs_s.at[pl.ds(0, nq)], (), layout=col_layout), (SUB, nq), [1])

    def raw_key_codes(slot, rows):
      """Raw int4 keys: a sub-tile's codes as M + c [SUB, R_k] (exact)."""
      return _dequant_int4_fused(
          plgpu.load(hk_s.at[slot, rows], layout=plgpu.Layout.WGMMA_UPCAST_4X),
          [], [], dtype)

    def raw_key_rows(slot, rows):
      """Raw int4 keys: a sub-tile's scale and offset - M·scale per row,
      f32 [SUB] (loaded before its key slot is released)."""
      sc = token_scales(sk_s.at[slot, rows])
      return sc, token_scales(zk_s.at[slot, rows]) - INT4_MAGIC[
          jnp.dtype(dtype)] * sc

    def raw_key_scores(s, sc, off):
      """scale·(q·(M + c)) + (offset - M·scale)·Σq: the scores [SUB, nq]
      of the dequantized keys from those of M + c."""
      row = lambda v: lax.broadcast_in_dim(v, (SUB, nq), [0])
      return s * row(sc) + row(off) * q_sum
    if rope:
      hh = spec.head_dim // 2
      # folded scores stay f32 from the accumulator to the row sum
      rot = jnp.dtype(jnp.float32 if fold else config.rotation_dtype)
      col = lambda k: lax.broadcast_in_dim(
          plgpu.load(k, (), layout=col_layout).astype(rot), (SUB, hh), [1])
      # fold: vec_s [1 + 2Q, H/2]; rebuild: [heads, 3, H/2] (inv_freq is
      # the same for every head)
      inv = plgpu.load(vec_s.at[0] if fold else vec_s.at[0, 0], (),
                       layout=col_layout)
      if has_bias and not fold:
        key_bias = [(col(vec_s.at[jj, 1]), col(vec_s.at[jj, 2]))
                    for jj in range(hc)]
      if fp8 or i8:   # B_k's column scales per KV head, f32 (float8:
        # powers of two), and with int8 codes Σ_r β·b per column
        colf = lambda k: lax.broadcast_in_dim(
            plgpu.load(k, (), layout=col_layout), (SUB, hh), [1])
        b_scales = [(colf(vec_s.at[jj, 3]), colf(vec_s.at[jj, 4]))
                    for jj in range(hc)]
        if i8:
          b_sums = [(colf(vec_s.at[jj, 5]), colf(vec_s.at[jj, 6]))
                    for jj in range(hc)]
      rows = plgpu.broadcasted_iota(jnp.int32, (SUB, hh), 0,
                                    layout=wgmma_layout).astype(jnp.float32)
      row_angle = rows * lax.broadcast_in_dim(inv, (SUB, hh), [1])
      cos_i, sin_i = (jnp.cos(row_angle).astype(rot),
                      jnp.sin(row_angle).astype(rot))

    def stage_values(slot, s0):
      """The tile's value codes -> 16-bit values in the WG's tile `vb_s`
      (float8 upcast, int4 dequantized; rows past the length zeroed; with
      value_halves the first window's)."""
      with jax.named_scope("v_wait"):
        plgpu.barrier_wait(vprod_bar.at[slot])
      with jax.named_scope("upcast"):
        values_to_tile(slot, s0, vb_s.at[wg], not mask_last,
                       window=chunks[0] if halves else None)

    def tile_at(i):
      """WG-local tile i -> (its tile index t, ring slot, first row)."""
      t = wg + n_wgs * i
      return t, lax.rem(t, stages), start + t * bs

    def rows_valid(s0, j):
      """[SUB, cols] bool: sub-tile j's rows (of a tile from row s0) that
      are before the sequence's length."""
      return s0 + j * SUB + plgpu.broadcasted_iota(
          jnp.int32, (SUB, cols), 0, layout=wgmma_layout) < length

    def head(i, first=None):
      """Tile i up to its scores: keys rebuilt (RoPE) or read, scored,
      masked past the length -> (scores [SUB, cols] per sub-tile, their
      row masks, the keys' float8 scales per sub-tile). `first`
      (rebuild_early): the rebuild product of sub-tile 0, head 0, issued
      and waited for by the caller after its key slot's wait."""
      t, slot, s0 = tile_at(i)
      if first is None:
        with jax.named_scope("k_wait"):
          plgpu.barrier_wait(kprod_bar.at[slot])
      scores, k_scales, valid_rows = [], [], []
      if together:          # raw int4 keys: [SUB, nq] scores per sub-tile
        with jax.named_scope("score"):
          def score_all(*refs):
            for j, ref in enumerate(refs):
              plgpu.wgmma(ref, raw_key_codes(slot, pl.ds(j * SUB, SUB)),
                          qf_s.T)
            if early:           # while the tensor core scores
              stage_values(slot, s0)
            return tuple(r[...] for r in refs)
          raw_scores = pl.run_scoped(
              score_all, *[plgpu.ACC((SUB, nq), jnp.float32)] * subs)
      for j in range(subs):
        rows = pl.ds(j * SUB, SUB)
        # a key slot is free once the tile's last sub-tile has been read
        # (float8: the values were copied out, the slot frees with the keys)
        release_keys = (split_rings or staged) and j == subs - 1

        def latent_product(operand, last, rows=rows,
                           release=release_keys and not int4, width=None,
                           a=None):
          """h_k sub-tile [SUB, R_k] · operand [R_k, N] -> f32 [SUB, N] on
          the tensor core (one wgmma, N = H, or hc·H with fused heads: the
          h_k rows are read from shared memory once, or, `a`, taken from
          registers: int4 keys dequantized); the sub-tile's last one frees
          the key slot (int4: freed once the codes are in registers)."""
          def product(ref):
            plgpu.wgmma(ref, hk_s.at[slot, rows] if a is None else a,
                        operand)
            return ref[...]
          out = pl.run_scoped(product, plgpu.ACC((SUB, width or 2 * hh),
                                                 jnp.float32))
          if release and last:
            plgpu.barrier_arrive(kcons_bar.at[slot])
          return out

        def int8_product(a, b_ref):
          """int8 codes [SUB, R_k] (the WG's int8 tile, or registers in the
          wgmma 8-bit layout) · int8 B_k [H, R_k] (K-major) -> f32 [SUB, H],
          summed exactly in int32."""
          def product(ref):
            if isinstance(a, jax.Array):
              # a register operand is one swizzle row wide: a wgmma each
              step = _swizzle(rk, 1)
              for o in range(0, rk, step):
                plgpu.wgmma(ref, a[:, o:o + step],
                            b_ref.at[:, pl.ds(o, step)].T)
            else:
              plgpu.wgmma(ref, a, b_ref.T)
            return ref[...]
          return pl.run_scoped(product, plgpu.ACC(
              (SUB, 2 * hh), jnp.int32)).astype(jnp.float32)

        if fold:
          c0 = col(base_s.at[slot, j, 0])
          z0 = col(base_s.at[slot, j, 1])
          per_query = []
          for n in range(spec.q_per_kv):
            # profile names as in "rebuild": the tensor-core stage, then
            # the rotation (here of the products, in f32)
            with jax.named_scope("rebuild"):
              cd = latent_product(u_s.at[n], n == spec.q_per_kv - 1)
            with jax.named_scope("rope"):
              c, d = cd[:, :hh], cd[:, hh:]
              if has_bias:
                c = c + col(vec_s.at[1 + 2 * n])
                d = d + col(vec_s.at[2 + 2 * n])
              per_query.append(folded_scores(c, d, cos_i, sin_i, c0, z0))
          # query n's scores (one per row) into column n of [SUB, nq]
          widen = lambda v: lax.broadcast_in_dim(v, (SUB, nq), [0])
          s = widen(per_query[0])
          if spec.q_per_kv > 1:
            qcol = plgpu.broadcasted_iota(jnp.int32, (SUB, nq), 1,
                                          layout=wgmma_layout)
            for n in range(1, spec.q_per_kv):
              s = jnp.where(qcol == n, widen(per_query[n]), s)
        elif rope:
          c0 = col(base_s.at[slot, j, 0])
          z0 = col(base_s.at[slot, j, 1])
          cos = sin = None
          per_head = []
          keys = None          # int4: the sub-tile's latents in registers
          if i8:    # int4 codes as int8 bytes, their token scale and offset
            with jax.named_scope("upcast"):
              keys = _int4_codes_as_int8(plgpu.load(
                  hk_s.at[slot, rows], layout=plgpu.Layout.WGMMA_UPCAST_4X))
              if config.int4_int8_keys_smem:   # the rebuild's A from there
                k8_s.at[wg][...] = keys
                plgpu.commit_smem()
                keys = k8_s.at[wg]
              key_rows = [lax.broadcast_in_dim(token_scales(r.at[slot, rows]),
                                               (SUB, hh), [0])
                          for r in (sk_s, zk_s)]
              if release_keys:     # codes, scales, offsets in registers
                plgpu.barrier_arrive(kcons_bar.at[slot])
          elif int4:
            with jax.named_scope("upcast"):
              keys = dequant4(hk_s.at[slot, rows], sk_s.at[slot, rows],
                              zk_s.at[slot, rows], s0 + j * SUB,
                              spec.shared and not mask_last)
              if release_keys:     # codes, scales, offsets in registers
                plgpu.barrier_arrive(kcons_bar.at[slot])
              if spec.shared or config.int4_keys_smem:
                # (shared: the same latents are the values)
                vb_s.at[wg, rows][...] = keys
              if config.int4_keys_smem:   # the rebuild's A from there
                plgpu.commit_smem()
                keys = vb_s.at[wg, rows]
          if fp8:
            with jax.named_scope("upcast"):
              k_scales.append(token_scales(sk_s.at[slot, rows]))
              if spec.shared:      # the same latents are the values
                vb_s.at[wg, rows][...] = upcast(hk_s.at[slot, rows],
                                                s0 + j * SUB, not mask_last)
          if fused:    # every head's keys side by side [SUB, hc·H]
            with jax.named_scope("rebuild"):
              k_all = latent_product(b_s, True, width=hc * 2 * hh, a=keys)
          rotated = []
          for jj in range(hc):
            with jax.named_scope("rebuild"):
              # float8: e4m3 codes times e4m3 B_k (K-major, [H, R_k]) at
              # the fp8 tensor rate; the scales after the dot, in f32
              if fused:
                k = k_all[:, jj * 2 * hh:(jj + 1) * 2 * hh]
              elif first is not None and j == 0 and jj == 0:
                k = first     # (released here, as latent_product would
                if release_keys and hc == 1:    # after the CTA's last head)
                  plgpu.barrier_arrive(kcons_bar.at[slot])
              elif i8:
                k = int8_product(keys, b_s.at[jj])
              else:
                k = latent_product(b_s.at[jj].T if fp8 else b_s.at[jj],
                                   jj == hc - 1, a=keys)
              k1, k2 = k[:, :hh], k[:, hh:]
              if fp8:
                row = lax.broadcast_in_dim(k_scales[j], (SUB, hh), [0])
                cs1, cs2 = b_scales[jj]
                k1, k2 = k1 * row * cs1, k2 * row * cs2
              if i8:     # s·β·(c·b) + z·Σ_r β·b, per row and column
                sc, off = key_rows
                (cs1, cs2), (bs1, bs2) = b_scales[jj], b_sums[jj]
                k1 = k1 * sc * cs1 + off * bs1
                k2 = k2 * sc * cs2 + off * bs2
            with jax.named_scope("rope"):
              # keys are rounded once, to the rotation type: f32->16-bit
              # converts issue at 16/clk/SM on sm_90 (8x slower than an
              # FMA), and each pass over a [64, 128] tile costs ~256
              # cycles, a quarter of the tile's rebuild on the tensor core
              k1, k2 = k1.astype(rot), k2.astype(rot)
              if has_bias:
                kb1, kb2 = key_bias[jj]
                k1, k2 = k1 + kb1, k2 + kb2
              if cos is None:       # of (s0 + i)·θ, once for all heads
                cos, sin = angle_sum(cos_i, sin_i, c0, z0)
              r1, r2 = rotate_halves(k1, k2, cos, sin)
              rotated += [r1.astype(q_dtype), r2.astype(q_dtype)]
            if fused:
              continue
            with jax.named_scope("score"):
              def score(ref, jj=jj, r=jnp.concatenate(rotated[-2:], axis=1)):
                plgpu.wgmma(ref, r, q_s.at[jj].T)
                return ref[...]
              sj = pl.run_scoped(score, plgpu.ACC((SUB, nq), jnp.float32))
              # 1/√H in f32, as the model
              per_head.append(sj * (spec.head_dim ** -0.5))
          if fused:
            with jax.named_scope("score"):
              # [SUB, hc·H] · block-diagonal queries [hc·nq, hc·H]ᵀ
              def score(ref, r=jnp.concatenate(rotated, axis=1)):
                plgpu.wgmma(ref, r, q_s.T)
                return ref[...]
              s = pl.run_scoped(score, plgpu.ACC((SUB, cols), jnp.float32))
              s = s * (spec.head_dim ** -0.5)
          else:
            s = (per_head[0] if hc == 1
                 else jnp.concatenate(per_head, axis=1))   # [SUB, cols]
        elif native:
          with jax.named_scope("score"):
            # e4m3 codes [SUB, R] · (hi + lo) [R, nq]: both K-major; one
            # accumulator per (part, chunk) with fp8_promote, else one
            pieces = [(part, o) for part in range(2)
                      for o in range(0, rk, k_step)]
            accs = len(pieces) if config.fp8_promote else 1

            def score(*refs, last=j == subs - 1):
              for n, (part, o) in enumerate(pieces):
                w = pl.ds(o, k_step)
                plgpu.wgmma(refs[n % accs], hk_s.at[slot, rows, w],
                            qf_s.at[part, :, w].T)
              if early and last:    # while the tensor core scores
                stage_values(slot, s0)
              return functools.reduce(operator.add, [r[...] for r in refs])
            s = pl.run_scoped(score, *[plgpu.ACC((SUB, nq), jnp.float32)]
                              * accs)
            k_scales.append(token_scales(sk_s.at[slot, rows]))
            if release_keys:
              plgpu.barrier_arrive(kcons_bar.at[slot])
            # the token's scale per row, the query part's per column (rows
            # past the length may hold NaN codes: masked below)
            s = (s * lax.broadcast_in_dim(k_scales[j], (SUB, nq), [0])
                 * lax.broadcast_in_dim(q_scale, (SUB, nq), [1]))
        elif together:     # the scores score_all issued, corrected
          with jax.named_scope("scale"):
            sc, off = raw_key_rows(slot, rows)
            if release_keys:       # the codes were read by score_all
              plgpu.barrier_arrive(kcons_bar.at[slot])
            s = raw_key_scores(raw_scores[j], sc, off)
        elif staged:     # float8 or int4 codes -> 16-bit keys in registers
          with jax.named_scope("upcast"):
            if raw:    # M + c (exact), the scale and offset per row, f32
              a = raw_key_codes(slot, rows)
              sc, off = raw_key_rows(slot, rows)
            elif int4:
              a = dequant4(hk_s.at[slot, rows], sk_s.at[slot, rows],
                           zk_s.at[slot, rows], s0 + j * SUB,
                           spec.shared and not mask_last)
            else:
              a = upcast(hk_s.at[slot, rows], s0 + j * SUB, not mask_last)
              k_scales.append(token_scales(sk_s.at[slot, rows]))
            if release_keys:       # codes and scales are in registers
              plgpu.barrier_arrive(kcons_bar.at[slot])
            if spec.shared:        # the same latents are the values
              vb_s.at[wg, rows][...] = a
          with jax.named_scope("score"):
            def score(ref, last=j == subs - 1):
              plgpu.wgmma(ref, a, qf_s.T)
              if early and last:    # while the tensor core scores
                stage_values(slot, s0)
              return ref[...]
            s = pl.run_scoped(score, plgpu.ACC((SUB, nq), jnp.float32))
            if fp8:    # one scale per token: a row factor of its scores
              s = s * lax.broadcast_in_dim(k_scales[j], (SUB, nq), [0])
            if raw:
              s = raw_key_scores(s, sc, off)
        else:
          with jax.named_scope("score"):
            def score(ref):
              plgpu.wgmma(ref, hk_s.at[slot, rows], qf_s.T)
              return ref[...]
            s = pl.run_scoped(score, plgpu.ACC((SUB, nq), jnp.float32))
            if release_keys:
              plgpu.barrier_arrive(kcons_bar.at[slot])
        valid_rows.append(rows_valid(s0, j))  # (raw int4 values: P's too)
        scores.append(jnp.where(valid_rows[-1], s, _FLOOR))
      return scores, valid_rows, k_scales, (t, slot, s0)

    def tail(i, carry, scores, valid_rows, k_scales, where=None):
      """Tile i from its scores on: the softmax update, the values (staged
      for float8 and int4), P stored, p·h_v -> the new carry. where: tile
      i's (t, slot, first row) if the caller has them."""
      acc, m, l, e = carry
      t, slot, s0 = where or tile_at(i)
      if private:
        with jax.named_scope("softmax"):
          m_new, l, corr, probs = softmax_step(
              m, l, scores,
              column_max=lambda x: _reduce_rows(x, red_s.at[wg], "max"))
      else:
        # Cross-warp reductions (max and sum over the rows) go through one
        # shared scratch buffer of the kernel, so the WGs take turns in
        # tile order: WG w waits for its turn (WG 0's first is free) and
        # hands it to WG w + 1 (mod W) after.
        with jax.named_scope("turn"):
          @pl.when(jnp.logical_or(wg > 0, i > 0))
          def _():
            plgpu.barrier_wait(turn_bar.at[wg])
        with jax.named_scope("softmax"):
          m_new, l, corr, probs = softmax_step(m, l, scores)
          plgpu.barrier_arrive(turn_bar.at[lax.rem(wg + 1, n_wgs)])
      p_scales = k_scales
      if staged and split_rings and not converter:
        if not early:
          stage_values(slot, s0)
        # float8: the values' scales per token (loaded before the slot is
        # handed back to the producer)
        # (and with raw int4 values their offsets)
        with jax.named_scope("scale"):     # (a profiler stage of its own)
          p_scales = [token_scales(sv_s.at[slot, pl.ds(j * SUB, SUB)])
                      for j in range(subs)] if fp8 or raw_v else []
          p_offsets = [token_scales(zv_s.at[slot, pl.ds(j * SUB, SUB)])
                       for j in range(subs)] if raw_v else []
          if not halves:   # (halves: after the second window's upcast)
            plgpu.barrier_arrive(vcons_bar.at[slot])
      with jax.named_scope("p_store"):
        if raw_v:     # e rescaled as the accumulator
          e = e * lax.broadcast_in_dim(corr, e.shape, [1])
        for j, prob in enumerate(probs):
          row = lambda v, prob=prob: lax.broadcast_in_dim(v, prob.shape, [0])
          if raw_v:   # r = p·scale, e += p·(offset + 8·scale) (rows past
            # the length: scales may be anything, so selected away)
            valid = valid_rows[j]
            sc = row(p_scales[j])
            e = e + jnp.where(valid, prob * (row(p_offsets[j]) + 8 * sc),
                              0.0)
            p_s.at[wg, j].T[...] = jnp.where(valid, prob * sc, 0.0).astype(
                p_s.dtype)
            continue
          if fp8 and mask_last:   # (scales past the length:
            prob = jnp.where(valid_rows[j],     # anything, so selected away)
                             prob * row(p_scales[j]), 0.0)
          elif fp8:   # the values' scale per token, folded into P
            prob = prob * row(p_scales[j])
          p_s.at[wg, j].T[...] = prob.astype(p_s.dtype)
        plgpu.commit_smem()                 # visible to the tensor core
        acc = tuple(a * lax.broadcast_in_dim(corr, a.shape, [1])
                    for a in acc)
      values = vb_s.at[wg] if staged else (hk_s if spec.shared else hv_s).at[
          slot]
      if converter:     # the tile's 16-bit values from the converter WG
        ring = lax.rem(t, n_wgs * VALUE_RING_PER_WG)
        values = vb_s.at[ring]
        with jax.named_scope("v_wait"):
          plgpu.barrier_wait(vready_bar.at[ring])
      if split_rings and not staged:
        with jax.named_scope("v_wait"):
          plgpu.barrier_wait(vprod_bar.at[slot])

      def clear_past_length():
        @pl.when(s0 + bs > length)
        def _():
          # rows past the length get probability 0, but 0·inf is NaN on the
          # tensor core: clear them in the sequence's last tile
          v = (plgpu.load(values, layout=wgmma_layout) if int4   # (lane
               else values[...])                # semantics: layouts given)
          row = plgpu.broadcasted_iota(jnp.int32, v.shape, 0,
                                       layout=wgmma_layout)
          values[...] = jnp.where(s0 + row < length, v, jnp.zeros_like(v))
          plgpu.commit_smem()

      def mix(accs, which):
        """acc[n] += values(n)ᵀ·P for the accumulators n in `which` (their
        value columns in the tile: `tile_chunks`); returns them."""
        def run(refs):
          for j in range(subs):
            for ref, n in zip(refs, which):
              off, size = tile_chunks[n]
              plgpu.wgmma(ref, values.at[pl.ds(j * SUB, SUB),
                                         pl.ds(off, size)].T,
                          p_s.at[wg, j].T)
        return pl.run_state(run)(tuple(plgpu.ACC.init(accs[n])
                                       for n in which))

      if halves:
        # window 0 was staged with the tile's values; window 1 waits for
        # window 0's p·h_v to reuse the tile (run_state's end waits for the
        # wgmma in each warp, and a warpgroup barrier for all four: a
        # warp's stores cover token rows that every warp's part of the
        # wgmma reads), and the value slot is released once it is read
        acc = list(acc)
        for n, window in enumerate(chunks):
          if n:
            with jax.named_scope("upcast"):
              plgpu.commit_smem()          # (its warpgroup barrier)
              values_to_tile(slot, s0, values, not mask_last, window=window)
              plgpu.barrier_arrive(vcons_bar.at[slot])
              plgpu.commit_smem()
          if mask_last:
            clear_past_length()
          with jax.named_scope("pv"):
            (acc[n],) = mix(acc, (n,))
        return tuple(acc), m_new, l, e

      if not staged or (mask_last and not converter and not raw_v):
        clear_past_length()

      with jax.named_scope("pv"):
        acc = mix(acc, range(len(chunks)))
        if not staged:         # (staged: released after the upcasts)
          plgpu.barrier_arrive(
              (vcons_bar if split_rings else kcons_bar).at[slot])
        if converter:          # the ring tile is the converter's again
          plgpu.barrier_arrive(vfree_bar.at[ring])
      return acc, m_new, l, e

    def tile(i, carry):
      return tail(i, carry, *head(i))

    acc0 = tuple(plgpu.layout_cast(jnp.zeros((size, cols), jnp.float32),
                                   wgmma_layout) for _, size in chunks)
    m0 = plgpu.layout_cast(jnp.full((cols,), _FLOOR, jnp.float32),
                           col_layout)
    # private reductions: the sum as per-row partials, reduced at the end
    l0 = (plgpu.layout_cast(jnp.zeros((SUB, cols), jnp.float32),
                            wgmma_layout) if private else
          plgpu.layout_cast(jnp.zeros((cols,), jnp.float32), col_layout))
    # raw int4 values: Σ_t p·(offset + 8·scale) per row and column
    e0 = (plgpu.layout_cast(jnp.zeros((SUB, cols), jnp.float32),
                            wgmma_layout) if raw_v else None)
    mine = (n_tiles - wg + n_wgs - 1) // n_wgs
    if rebuild_early(spec, rope, config):
      # v30: tile i's first rebuild wgmma is issued, then tile i - 1's tail
      # (softmax, values, P, p·h_v) runs while the tensor core rebuilds,
      # then tile i's head goes on from the product: the scores (and
      # float8 key scales) of a tile wait one iteration in the carry
      operand0 = b_s.at[0].T if fp8 else b_s.at[0]

      def finish(i, carry, prev):
        """Tile i's tail from its carried (scores, float8 key scales)."""
        _, _, s0 = tile_at(i)
        return tail(i, carry, prev[0], [rows_valid(s0, j)
                                        for j in range(subs)], prev[1])

      def pipelined(i, state):
        carry, prev = state[:4], state[4:]
        _, slot, _ = tile_at(i)
        with jax.named_scope("k_wait"):
          plgpu.barrier_wait(kprod_bar.at[slot])

        def overlap(ref):
          plgpu.wgmma(ref, hk_s.at[slot, pl.ds(0, SUB)], operand0)
          new = lax.cond(i > 0, lambda: finish(i - 1, carry, prev),
                         lambda: carry)
          with jax.named_scope("rebuild"):
            return ref[...], new
        first, carry = pl.run_scoped(
            overlap, plgpu.ACC((SUB, 2 * hh), jnp.float32))
        scores, _, k_scales, _ = head(i, first)
        return (*carry, scores, k_scales)

      prev0 = ([plgpu.layout_cast(jnp.full((SUB, cols), _FLOOR, jnp.float32),
                                  wgmma_layout)] * subs,
               [plgpu.layout_cast(jnp.zeros((SUB,), jnp.float32),
                                  row_layout)] * (subs if fp8 else 0))
      *carry, scores, k_scales = lax.fori_loop(
          0, mine, pipelined, (acc0, m0, l0, e0, *prev0))
      acc, m, l, e = lax.cond(
          mine > 0, lambda: finish(mine - 1, tuple(carry), (scores, k_scales)),
          lambda: tuple(carry))
    else:
      acc, m, l, e = lax.fori_loop(0, mine, tile, (acc0, m0, l0, e0))
    if private:
      l = _reduce_rows(l, red_s.at[wg], "add")
    if raw_v:    # the same correction in every latent row of a column
      e = _reduce_rows(e, red_s.at[wg], "add")
      acc = tuple(a + lax.broadcast_in_dim(e, a.shape, [1]) for a in acc)
    def store(part, acc, m, l):
      for a, (off, size) in zip(acc, chunks):
        # overlapping chunks hold the same values in their common rows
        acc_o[b, x, part, pl.ds(off, size)] = a
      m_o[b, x, part] = m
      l_o[b, x, part] = l

    if not config.merge_wgs:     # one partial per split and WG
      part = p * n_wgs + wg
      store(part, acc, m, l)
      if config.merge_in_kernel:
        merge_parts(part)
    else:
      # the WGs hand the split's partial down: WG n-1 stores it, each WG
      # below waits for it, merges it with its own and stores over it
      @pl.when(wg < n_wgs - 1)
      def _():
        plgpu.barrier_wait(merge_bar.at[wg + 1])

      @pl.when(wg == n_wgs - 1)
      def _():
        store(p, acc, m, l)

      @pl.when(wg < n_wgs - 1)
      def _():
        prev_acc = tuple(load_stored(acc_o, p, wgmma_layout, pl.ds(off, size))
                         for off, size in chunks)
        prev_m = load_stored(m_o, p, col_layout)
        prev_l = load_stored(l_o, p, col_layout)
        (w_own, w_prev), l_both = split_weights([m, prev_m], [l, prev_l])
        spread = lambda w, a: lax.broadcast_in_dim(w, a.shape, [1])
        store(p, tuple(spread(w_own, a) * a + spread(w_prev, c) * c
                       for a, c in zip(acc, prev_acc)),
              jnp.maximum(m, prev_m), l_both)

      @pl.when(wg > 0)
      def _():   # (the arrival releases this WG's stores to the waiter)
        plgpu.barrier_arrive(merge_bar.at[wg])

      if config.merge_in_kernel:
        pl.when(wg == 0)(lambda: merge_parts(p))

  def convert(first: int):
    """A converter WG: the value codes of tiles first, first + n, ... (n
    converter WGs) -> 16-bit values in the ring (rows past the length
    zeroed); the compute WG of tile t reads ring slot t mod
    (W · VALUE_RING_PER_WG)."""
    _set_registers(_CONVERTER_REGISTERS[converters][2], all_wgs)
    slots = n_wgs * VALUE_RING_PER_WG

    @pl.loop(first, n_tiles, step=converters)
    def _(t):
      slot, ring = lax.rem(t, stages), lax.rem(t, slots)

      @pl.when(t >= slots)
      @jax.named_scope("c_free")
      def _():
        plgpu.barrier_wait(vfree_bar.at[ring])
      with jax.named_scope("c_wait"):
        plgpu.barrier_wait(vprod_bar.at[slot])
      s0 = start + t * bs
      with jax.named_scope("c_convert"):     # (c_store: its stores)
        values_to_tile(slot, s0, vb_s.at[ring], True, store_scope="c_store")
        plgpu.commit_smem()            # visible to the tensor core
      plgpu.barrier_arrive(vcons_bar.at[slot])
      plgpu.barrier_arrive(vready_bar.at[ring])

  for c in range(converters):      # WGs after the producer
    pl.when(wg == n_wgs + 1 + c)(functools.partial(convert, c))

  @pl.when(wg == n_wgs)
  def _memory():
    _set_registers(_CONVERTER_REGISTERS[converters][0] if converter
                   else _PRODUCER_REGISTERS[n_wgs], all_wgs)
    if fold:
      for n in range(spec.q_per_kv):   # TMA: at most 5 strided dims
        plgpu.copy_gmem_to_smem(u_g.at[b, x, n], u_s.at[n], setup_bar.at[0])
      plgpu.copy_gmem_to_smem(vec_g.at[b, x], vec_s, setup_bar.at[0])
    elif fused:                        # one B_k and one query block
      plgpu.copy_gmem_to_smem(bk_g.at[x], b_s, setup_bar.at[0])
      plgpu.copy_gmem_to_smem(q_g.at[b, x], q_s, setup_bar.at[0])
      plgpu.copy_gmem_to_smem(vec_g.at[x], vec_s, setup_bar.at[0])
    elif rope:
      for jj in range(hc):             # TMA: at most 5 strided dims
        plgpu.copy_gmem_to_smem(bk_g.at[x, jj], b_s.at[jj], setup_bar.at[0])
        plgpu.copy_gmem_to_smem(q_g.at[b, x, jj], q_s.at[jj],
                                setup_bar.at[0])
      plgpu.copy_gmem_to_smem(vec_g.at[x], vec_s, setup_bar.at[0])
    else:
      if native:     # one TMA per query part: [2, nq, R] tiled for 1-byte
        for part in range(2):    # codes is 6 strided dims at nq = 16 (> 5)
          plgpu.copy_gmem_to_smem(qf_g.at[b, x, part], qf_s.at[part],
                                  setup_bar.at[0])
        plgpu.copy_gmem_to_smem(qs_g.at[b, x], qs_s, setup_bar.at[0])
      else:
        plgpu.copy_gmem_to_smem(qf_g.at[b, x], qf_s, setup_bar.at[0])
        if raw:                          # the query's column sums
          plgpu.copy_gmem_to_smem(qs_g.at[b, x], qs_s, setup_bar.at[0])

    def load_keys(t):
      slot = lax.rem(t, stages)

      @pl.when(t >= stages)
      @jax.named_scope("k_free")
      def _():
        plgpu.barrier_wait(kcons_bar.at[slot])
      rows = pl.ds(start + t * bs, bs)
      # the group is a major index: TMA sources are never offset along
      # their minor (swizzled) dimension by a traced value
      plgpu.copy_gmem_to_smem(hk_g.at[b, rows, g], hk_tma.at[slot],
                              kprod_bar.at[slot])
      if fp8:                        # scales [B, G, S]: one per token
        plgpu.copy_gmem_to_smem(sk_g.at[b, g, rows], sk_s.at[slot],
                                kprod_bar.at[slot])
      if int4:    # [B, S, G, R/qg] per quant group, or [B, G, S] per token
        at = (b, g, rows) if token_scaled else (b, rows, g)
        plgpu.copy_gmem_to_smem(sk_g.at[at], sk_s.at[slot],
                                kprod_bar.at[slot])
        plgpu.copy_gmem_to_smem(zk_g.at[at], zk_s.at[slot],
                                kprod_bar.at[slot])
      if rope:
        first = (p * span + t * bs) // SUB      # the tile's cos/sin rows
        plgpu.copy_gmem_to_smem(base_g.at[pl.ds(first, subs)],
                                base_s.at[slot], kprod_bar.at[slot])

    def load_values(t):
      slot = lax.rem(t, stages)

      @pl.when(t >= stages)
      @jax.named_scope("v_free")
      def _():
        plgpu.barrier_wait(vcons_bar.at[slot])
      rows = pl.ds(start + t * bs, bs)
      plgpu.copy_gmem_to_smem(hv_g.at[b, rows, g], hv_tma.at[slot],
                              vprod_bar.at[slot])
      if fp8:
        plgpu.copy_gmem_to_smem(sv_g.at[b, g, rows], sv_s.at[slot],
                                vprod_bar.at[slot])
      if int4:
        at = (b, g, rows) if token_scaled else (b, rows, g)
        plgpu.copy_gmem_to_smem(sv_g.at[at], sv_s.at[slot],
                                vprod_bar.at[slot])
        plgpu.copy_gmem_to_smem(zv_g.at[at], zv_s.at[slot],
                                vprod_bar.at[slot])

    # keys run one tile ahead of values: a key slot frees early (after the
    # tile's first wgmma), a value slot only at the tile's end, and waiting
    # for the latter must not hold back the next key load
    @pl.loop(0, n_tiles)
    def _(t):
      load_keys(t)
      if split_rings:
        @pl.when(t >= 1)
        def _():
          load_values(t - 1)

    if split_rings:
      @pl.when(n_tiles > 0)
      def _():
        load_values(n_tiles - 1)


def merge_partials(acc: Array, m: Array, l: Array, *, spec: LatentSpec,
                   rope: bool, hc: int, nq: int) -> Array:
  """The kernel's partials as it stores them, acc [B, X, P, R_v, cols]
  and m, l [B, X, P, cols], without their padding columns, merged ->
  [B, X, heads, R_v] f32 (heads: the program's query heads, in order).
  With RoPE the columns are nq per KV head of the CTA (q_per_kv real ones);
  without, the group's heads first."""
  acc, m, l = (real_columns(a, spec=spec, rope=rope, hc=hc, nq=nq)
               for a in (acc, m, l))
  # merged in the stored layout, then one transpose of the merged values
  return combine_splits(acc, m, l, rows_first=True)


def real_columns(a: Array, *, spec: LatentSpec, rope: bool, hc: int,
                 nq: int) -> Array:
  """[..., cols] -> [..., heads]: the program's query heads of the
  kernel's columns, without the padding (RoPE: nq columns per KV head of
  the CTA, q_per_kv real; no RoPE: the group's heads first)."""
  if not rope:
    return a[..., :spec.heads_per_group]
  lead = a.shape[:-1]
  a = a.reshape(lead + (hc, nq))[..., :spec.q_per_kv]
  return a.reshape(lead + (hc * spec.q_per_kv,))


def _rope_operands(q: Array, k_up: Array, k_bias: Array | None,
                   inv_freq: Array, spec: LatentSpec, nq: int, dtype,
                   cache_len: int, q_dtype=None):
  """q [B, N, H] (rotated) -> [B, G·J, nq, H] in q_dtype (default: dtype;
  the query rows of each KV head, zero-padded to nq); B_k per KV head [G·J, R_k, H]; per
  KV head the f32 vectors [G·J, 3, H/2]: inv_freq, bias first half, bias
  second half; and cos/sin of the first position of each sub-tile of 64
  rows [S/64, 2, H/2] (f32, computed as the model computes its tables:
  angle = pos·θ in f32)."""
  g, j, qk, h = spec.groups, spec.kv_per_group, spec.q_per_kv, spec.head_dim
  hh = h // 2
  batch = q.shape[0]
  qh = q.reshape(batch, g * j, qk, h)
  qh = jnp.pad(qh, [(0, 0), (0, 0), (0, nq - qk), (0, 0)]).astype(
      q_dtype or dtype)
  bk, kb = _per_kv_head(k_up, k_bias, spec, dtype)
  inv = jnp.broadcast_to(jnp.asarray(inv_freq, jnp.float32)[None], (g * j, hh))
  vecs = jnp.stack([inv, kb[:, :hh], kb[:, hh:]], axis=1)
  return bk, qh, vecs, _subtile_angles(inv_freq, cache_len)


def _per_kv_head(k_up: Array, k_bias: Array | None, spec: LatentSpec,
                 dtype) -> tuple[Array, Array]:
  """B_k [G·R_k, J·H] regrouped per KV head -> [G·J, R_k, H] in dtype, and
  the key bias per KV head [G·J, H] as f32 of its dtype value (zeros when
  there is none)."""
  g, j, h = spec.groups, spec.kv_per_group, spec.head_dim
  bk = k_up.reshape(g, spec.k_rank, j, h).transpose(0, 2, 1, 3)
  bk = bk.reshape(g * j, spec.k_rank, h).astype(dtype)
  if k_bias is None:
    return bk, jnp.zeros((g * j, h), jnp.float32)
  return bk, k_bias.astype(dtype).astype(jnp.float32).reshape(g * j, h)


def _scaled_columns(k_up: Array, spec: LatentSpec, code_max: float
                    ) -> tuple[Array, Array]:
  """B_k per KV head over its power-of-two scale per column, f32
  [G·J, R_k, H] (each column within ±code_max), and the scales [G·J, H]."""
  bk, _ = _per_kv_head(k_up, None, spec, jnp.float32)
  scale = pow2_scale(jnp.max(jnp.abs(bk), axis=1), jnp.float32,
                     code_max=code_max)
  return bk / scale[:, None, :], scale


def _e4m3_columns(k_up: Array, spec: LatentSpec) -> tuple[Array, Array]:
  """B_k per KV head as e4m3 codes, K-major [G·J, H, R_k], and its
  power-of-two scale per column [G·J, H] (f32): B_k = codes · scale, as
  `--k-up-bits 8` stores it (`fp8_quant.round_weight_columns`); a B_k not
  already so rounded is rounded here."""
  scaled, scale = _scaled_columns(k_up, spec, E4M3_MAX)
  return jnp.swapaxes(scaled.astype(E4M3_CODE), 1, 2), scale


INT8_MAX = 127      # int8 codes of B_k stay within ±127


def int8_columns(k_up: Array, spec: LatentSpec) -> tuple[Array, Array]:
  """B_k per KV head as int8 codes, K-major [G·J, H, R_k] (rows in their
  natural order), and one power-of-two f32 scale per column [G·J, H] (at
  or above the column's max |B_k| / 127, so code·scale has 7 significant
  bits and is exact in bf16): B_k ≈ codes · scale, what `int4_int8_rebuild`
  multiplies; `int8_rebuild_weight` gives that B_k."""
  scaled, scale = _scaled_columns(k_up, spec, INT8_MAX)
  codes = jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX)
  return jnp.swapaxes(codes.astype(jnp.int8), 1, 2), scale


def int8_rebuild_weight(k_up: Array, spec: LatentSpec) -> Array:
  """B_k [G·R_k, J·H] as `int4_int8_rebuild` rounds it (codes · scale,
  f32, exact in bf16; rounding it again gives it back): the weights a
  reference computes with to match that kernel."""
  codes, scale = int8_columns(k_up, spec)
  g, j, h = spec.groups, spec.kv_per_group, spec.head_dim
  w = jnp.swapaxes(codes.astype(jnp.float32), 1, 2) * scale[:, None, :]
  return w.reshape(g, j, spec.k_rank, h).transpose(0, 2, 1, 3).reshape(
      g * spec.k_rank, j * h)


def _subtile_angles(inv_freq: Array, cache_len: int) -> Array:
  """cos/sin of the first position of each sub-tile of 64 rows
  [S/64, 2, H/2] (f32, as the model computes its tables: pos·θ in f32)."""
  starts = jnp.arange(0, cache_len, SUB, dtype=jnp.float32)
  angle = starts[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
  return jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)


def _fold_operands(q: Array, k_up: Array, k_bias: Array | None,
                   inv_freq: Array, spec: LatentSpec, dtype):
  """Queries folded into B_k for `rope_mode="fold"`: q [B, N, H] (rotated)
  -> U [B, G·J, Q, R_k, H] in dtype, per query head of each KV head the
  columns [U | V] of `folded_scores` scaled by 1/√H (one rounding, of the
  f32 product); and the f32 vectors [B, G·J, 1 + 2Q, H/2]: inv_freq, then
  per query head the key bias folded the same way (its c and d terms)."""
  g, j, qk, h = spec.groups, spec.kv_per_group, spec.q_per_kv, spec.head_dim
  hh = h // 2
  batch = q.shape[0]
  f32 = jnp.float32
  qh = q.astype(f32).reshape(batch, g * j, qk, h) * h ** -0.5
  q1, q2 = qh[..., :hh], qh[..., hh:]
  bk, kb = _per_kv_head(k_up, k_bias, spec, dtype)
  bk = bk.astype(f32)
  b1, b2 = bk[..., :hh], bk[..., hh:]
  mix = lambda bb, qq: jnp.einsum("xri,bxni->bxnri", bb, qq)
  u = jnp.concatenate([mix(b1, q1) + mix(b2, q2), mix(b1, q2) - mix(b2, q1)],
                      axis=-1).astype(dtype)
  kb1, kb2 = kb[None, :, None, :hh], kb[None, :, None, hh:]
  cb = kb1 * q1 + kb2 * q2                                   # [B, X, Q, hh]
  db = kb1 * q2 - kb2 * q1
  inv = jnp.broadcast_to(jnp.asarray(inv_freq, f32), (batch, g * j, 1, hh))
  bias = jnp.stack([cb, db], axis=3).reshape(batch, g * j, 2 * qk, hh)
  return u, jnp.concatenate([inv, bias], axis=2)


def _group_major(h: Array, groups: int) -> Array:
  """[B, S, G·R] -> [B, S, G, R] (a free reshape): the group becomes an
  index of its own instead of an offset along the minor dimension."""
  b, s, w = h.shape
  return h.reshape(b, s, groups, w // groups)


@functools.partial(jax.jit, static_argnames=("spec", "config"))
def latent_attention(q: Array, hk: Array, hv: Array | None, k_up: Array,
                     lengths: Array, *, spec: LatentSpec,
                     inv_freq: Array | None, k_bias: Array | None = None,
                     config: MosaicConfig | None = None) -> Array:
  """Decode attention of one token per sequence over a latent cache.

  Same arguments and result as `latent_rope_attention` (inv_freq given:
  keys with RoPE) or `absorb_attention` (inv_freq None); hk, hv are
  [B, S, G·R] bf16/fp16 arrays, or (`fp8_latents`) `QuantLatent`s of
  float8 codes with one scale per token and group. Returns [B, N, R_v]
  float32.
  """
  rope = inv_freq is not None
  fp8 = spec.bits == 8
  if fp8:
    (hk, sk), v_side = cache_sides(hk, hv, spec)
    hv, sv = v_side or (None, sk)
    # scales [B, S, G] -> [B, G, S]: a tile's scales are one TMA row
    sk, sv = jnp.swapaxes(sk, 1, 2), jnp.swapaxes(sv, 1, 2)
  int4 = spec.bits == 4
  if int4:
    (hk, sk, zk), v_side = cache_sides(hk, hv, spec)
    hv, sv, zv = v_side or (None, sk, zk)
    if int4_token_scales(spec):   # [B, S, G] -> [B, G, S]: one TMA row
      sk, zk, sv, zv = (jnp.swapaxes(a, 1, 2) for a in (sk, zk, sv, zv))
    else:   # [B, S, G·R/qg] -> [B, S, G, R/qg] (free reshapes)
      sk, zk, sv, zv = (_group_major(a, spec.groups)
                        for a in (sk, zk, sv, zv))
  batch, s = hk.shape[:2]
  if config is None:
    config = choose_config(spec, batch=batch, cache_len=s, rope=rope)
  i8 = int8_rebuild(spec, rope, config)   # int4 RoPE keys: an int8 rebuild
  converter = int4_converter(spec, rope, config)
  dtype = q.dtype
  nq = query_cols(spec, rope)
  hc = heads_per_cta(rope, config)
  cols = hc * nq
  bs = config.block_s
  splits, span = split_spans(s, config)
  rk, rv = spec.k_rank, spec.v_rank
  hv_in = hk if spec.shared else hv
  k_swizzle = _swizzle(rk)
  fold = rope and config.rope_mode == "fold"
  if fold:
    hh = spec.head_dim // 2
    k_swizzle = min(k_swizzle, _swizzle(2 * hh))
    u, vecs = _fold_operands(q, k_up, k_bias, inv_freq, spec, dtype)
    operands = (u, vecs, _subtile_angles(inv_freq, s))
    scratch = [plgpu.SMEM((spec.q_per_kv, rk, 2 * hh), dtype,
                          transforms=_transforms(k_swizzle)),
               plgpu.SMEM((1 + 2 * spec.q_per_kv, hh), jnp.float32),
               plgpu.SMEM((config.stages, bs // SUB, 2, hh), jnp.float32)]
    n_setup = 1 + spec.q_per_kv
    x_size = spec.groups * spec.kv_per_group
  elif rope:
    hh = spec.head_dim // 2
    # the rebuild's A (h_k tile) and B (B_k) share one swizzle
    k_swizzle = min(k_swizzle, _swizzle(2 * hh))
    bk, qh, vecs, angles = _rope_operands(q, k_up, k_bias, inv_freq, spec, nq,
                                          dtype, s, scores_dtype(config, dtype))
    order = int4_order(spec, config, rk) if int4 else None
    if order is not None:   # B_k's rows in the keys' column order
      bk = bk[:, order, :]
    x_size = spec.groups * spec.kv_per_group // hc
    n_vec = 3
    if fp8:   # B_k as e4m3 codes, K-major, + its column scales (f32 rows)
      bk, col_scale = _e4m3_columns(k_up, spec)
      vecs = jnp.concatenate([vecs, col_scale.reshape(-1, 2, hh)], axis=1)
      n_vec = 5
    if i8:    # B_k as int8 codes, K-major, rows in the keys' column order,
      # + its column scales and Σ_r β·b per column (f32 rows)
      codes8, col_scale = int8_columns(k_up, spec)
      col_sum = jnp.sum(codes8.astype(jnp.float32), axis=2) * col_scale
      bk = codes8[..., int8_key_column_order(rk)]
      vecs = jnp.concatenate([vecs, col_scale.reshape(-1, 2, hh),
                              col_sum.reshape(-1, 2, hh)], axis=1)
      n_vec = 7
    # each CTA's `hc` KV heads side by side (free reshapes)
    bk = bk.reshape((x_size, hc) + bk.shape[1:])
    qh = qh.reshape(batch, x_size, hc, nq, 2 * hh)
    q_smem = plgpu.SMEM((hc, nq, 2 * hh), scores_dtype(config, dtype),
                        transforms=_transforms(_swizzle(2 * hh)))
    fused = fused_heads(spec, rope, config)
    if fused:
      # B_k [X, R_k, hc·H] (the heads' columns side by side, as one wgmma
      # operand) and the block-diagonal queries [B, X, hc·nq, hc·H]
      bk = jnp.swapaxes(bk, 1, 2).reshape(x_size, rk, hc * 2 * hh)
      qh = block_diagonal_queries(qh)
      q_smem = plgpu.SMEM(qh.shape[2:], qh.dtype,
                          transforms=_transforms(_swizzle(hc * 2 * hh)))
    operands = (bk, qh, vecs.reshape(x_size, hc, n_vec, hh), angles)
    if int4:
      operands += (sk, zk, sv, zv)
    if fp8:
      operands += (sk, sv)
    if fp8 or i8:
      b_smem = plgpu.SMEM((hc, 2 * hh, rk), bk.dtype,
                          transforms=_transforms(_swizzle(rk, 1), 1))
    else:
      b_smem = plgpu.SMEM(bk.shape[1:], dtype,
                          transforms=_transforms(k_swizzle))
    scratch = [b_smem, q_smem,
               plgpu.SMEM((hc, n_vec, hh), jnp.float32),
               plgpu.SMEM((config.stages, bs // SUB, 2, hh), jnp.float32)]
    n_setup = 3 if fused else 1 + 2 * hc
  elif int4:
    # packed codes [B, S, G·R/2] -> [B, S, G, R/2] as the rings' bytes
    qf = absorbed_queries(q, k_up, spec, nq, dtype)       # [B, G, nq, R_k]
    order = int4_order(spec, config, rk)
    if order is not None:             # the keys' column order in registers
      qf = qf[..., order]
    operands = (qf, sk, zk, sv, zv)
    scratch = [plgpu.SMEM((nq, rk), dtype,
                          transforms=_transforms(_swizzle(rk)))]
    n_setup = 1
    if raw_int4_keys(spec, rope, config):   # Σq per query column, f32
      # padded to 32 values: a TMA copy moves a multiple of 128 bytes here
      q_sum = jnp.sum(qf.astype(jnp.float32), axis=-1)       # [B, G, nq]
      q_sum = jnp.pad(q_sum, ((0, 0), (0, 0), (0, -nq % 32)))
      operands = (qf, q_sum) + operands[1:]
      scratch.append(plgpu.SMEM(q_sum.shape[-1:], jnp.float32))
      n_setup = 2
    x_size = spec.groups
  elif fp8_scores(spec, rope, config):
    # scores from the e4m3 codes: the query as two e4m3 parts + a scale
    hilo, q_scale = e4m3_hi_lo(absorbed_queries(q, k_up, spec, nq,
                                                jnp.float32))
    operands = (jnp.swapaxes(hilo, 2, 3), q_scale, sk, sv)  # [B, G, 2, nq, R]
    scratch = [plgpu.SMEM((2, nq, rk), E4M3_CODE,
                          transforms=_transforms(_swizzle(rk, 1), 1)),
               plgpu.SMEM((nq,), jnp.float32)]
    n_setup = 3                      # two query parts and their scales
    x_size = spec.groups
  else:
    # float8 codes are upcast to f16 (exact): the products run in f16
    operands = (absorbed_queries(q, k_up, spec, nq,
                                 jnp.float16 if fp8 else dtype),)
    if fp8:
      operands += (sk, sv)
    scratch = [plgpu.SMEM((nq, rk), operands[0].dtype,
                          transforms=_transforms(_swizzle(rk)))]
    n_setup = 1
    x_size = spec.groups
  if fp8:
    code = E4M3_CODE
    ring_k = plgpu.SMEM((config.stages, bs, rk), code,
                        transforms=_transforms(_swizzle(rk, 1), 1))
    ring_v = plgpu.SMEM((config.stages, bs, rv), code,
                        transforms=_transforms(_swizzle(rv, 1), 1))
  elif int4:
    def codes_ring(r):
      """One ring slot per stage [bs, R] of codes, as bytes and as int4
      (the same swizzled rows: 8 rows of `sw` bytes per tile)."""
      sw = _swizzle(r // 2, 1)
      return plgpu.RefUnion(
          plgpu.SMEM((config.stages, bs, r // 2), jnp.uint8,
                     transforms=_transforms(sw, 1)),
          plgpu.SMEM((config.stages, bs, r), jnp.int4,
                     transforms=(plgpu.TilingTransform((8, 2 * sw)),
                                 plgpu.SwizzleTransform(sw))))
    ring_k, ring_v = codes_ring(rk), codes_ring(rv)
  else:
    ring_k = plgpu.SMEM((config.stages, bs, rk), dtype,
                        transforms=_transforms(k_swizzle))
    ring_v = plgpu.SMEM((config.stages, bs, rv), dtype,
                        transforms=_transforms(_swizzle(rv)))
  # p·h_v: A (h_v tile, transposed) and B (Pᵀ) share one swizzle
  v_cols = value_tile_cols(spec, rope, config)   # R_v, or a window's width
  v_swizzle = (k_swizzle if spec.shared and not (fp8 or int4)
               else _swizzle(v_cols))
  p_dtype = jnp.float16 if fp8 else dtype
  p_smem = plgpu.SMEM((config.compute_wgs, bs // SUB, cols, SUB), p_dtype,
                      transforms=_transforms(min(v_swizzle, _swizzle(SUB))))
  unused = plgpu.SMEM((1, 8, 64), dtype)  # no value ring: shared latent
  # + the tile's cos/sin row (RoPE), its scales (float8) or its scales and
  # offsets (int4)
  per_key_tile = 1 + rope + fp8 + 2 * int4
  ring_bars = functools.partial(plgpu.Barrier, num_barriers=config.stages)
  scratch += [ring_k, unused if spec.shared else ring_v]
  if fp8:   # scale rings of keys and values, each WG's f16 value tile
    scratch += [plgpu.SMEM((config.stages, bs), sk.dtype),
                plgpu.SMEM((config.stages, bs), sv.dtype),
                plgpu.SMEM((config.compute_wgs, bs, v_cols), jnp.float16,
                           transforms=_transforms(v_swizzle))]
  if int4:  # scale and offset rings of keys and values, each WG's values
    groups_of = lambda r: (config.stages, bs) + (
        () if int4_token_scales(spec) else (r // spec.quant_group,))
    v_groups = (1, 8, 8) if spec.shared else groups_of(rv)   # (unused)
    scratch += [plgpu.SMEM(groups_of(rk), sk.dtype),
                plgpu.SMEM(groups_of(rk), zk.dtype),
                plgpu.SMEM(v_groups, sv.dtype),
                plgpu.SMEM(v_groups, zv.dtype),
                # each WG's values, or with a converter WG the value ring
                plgpu.SMEM((config.compute_wgs * (
                    VALUE_RING_PER_WG if converter else 1), bs, rv), dtype,
                           transforms=_transforms(_swizzle(rv)))]
  scratch += [p_smem,
              plgpu.Barrier(num_arrivals=n_setup, num_barriers=1),
              ring_bars(num_arrivals=per_key_tile),
              ring_bars(num_arrivals=1 + fp8 + 2 * int4),
              ring_bars(num_arrivals=1), ring_bars(num_arrivals=1),
              plgpu.Barrier(num_arrivals=1, num_barriers=config.compute_wgs),
              plgpu.SMEM((config.compute_wgs, reduction_scratch_elems(cols)),
                         jnp.float32)]
  if converter:   # value ring slots: dequantized, and free again
    slots = config.compute_wgs * VALUE_RING_PER_WG
    scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=slots)] * 2
  if config.merge_wgs:   # WG w's partial stored (w ≥ 1; index 0 unused)
    scratch.append(plgpu.Barrier(num_arrivals=1,
                                 num_barriers=config.compute_wgs))
  if i8 and config.int4_int8_keys_smem:
    scratch.append(plgpu.SMEM((config.compute_wgs, SUB, rk), jnp.int8,
                              transforms=_transforms(_swizzle(rk, 1), 1)))
  parts = stored_parts(config, splits)
  merged = config.merge_in_kernel
  if why := merge_in_kernel_refused(config, splits):
    raise ValueError(why)
  shape = (batch, x_size, parts)
  # merge_in_kernel: the merged rows behind the partials (index `parts`)
  out_type = [jax.ShapeDtypeStruct((batch, x_size, parts + merged, rv, cols),
                                   jnp.float32),
              jax.ShapeDtypeStruct(shape + (cols,), jnp.float32),
              jax.ShapeDtypeStruct(shape + (cols,), jnp.float32)]
  kernel = functools.partial(_kernel, spec=spec, rope=rope, config=config,
                             span=span, nq=nq, dtype=dtype,
                             has_bias=k_bias is not None, splits=splits,
                             x_size=x_size)
  params = {}
  if config.profile_space:
    # events past profile_space are dropped (a truncated trace), not
    # written over the shared memory next to the buffer
    params.update(profile_space=config.profile_space,
                  profile_dir=config.profile_dir, profile_bounds_check=True)
  if int4:
    # the column loads of the scale tiles (strided) are refused by the
    # warpgroup semantics' layout inference ("cannot apply swizzle to
    # non-contiguous refs"); every layout here is given explicitly
    params.update(lowering_semantics=plgpu.LoweringSemantics.Lane)
  compiler_params = plgpu.CompilerParams(**params) if params else None
  acc, m, l = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      compiler_params=compiler_params,
      grid=(x_size, splits, batch), grid_names=("x", "p", "b"),
      num_threads=config.compute_wgs + 1 + converter_wgs(spec, rope, config),
      thread_name="wg",
      kernel_name="palu_latent_" + ("rope" if rope else "norope"),
  )(lengths.astype(jnp.int32), _group_major(hk, spec.groups),
    _group_major(hv_in, spec.groups), *operands)
  if merged:     # [B, X, R_v, cols] -> [B, X, heads, R_v]
    out = jnp.swapaxes(real_columns(acc[:, :, parts], spec=spec, rope=rope,
                                    hc=hc, nq=nq), -1, -2)
  else:
    out = merge_partials(acc, m, l, spec=spec, rope=rope, hc=hc, nq=nq)
  order = int4_order(spec, config, rv)
  if order is not None:               # back from the values' column order
    out = out[..., np.argsort(order)]
  return out.reshape(batch, spec.n_heads, rv)
