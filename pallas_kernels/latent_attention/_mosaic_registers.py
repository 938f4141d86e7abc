"""Register routines of the Mosaic GPU latent kernel: int4 codes turned
into 16-bit latents or int8 bytes in place (inline PTX on whole 32-bit
registers), register layouts reinterpreted as the wgmma's, and a
warpgroup's row reduction through its own shared-memory scratch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith as arith_dialect
from jax._src.lib.mlir.dialects import llvm as llvm_dialect
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu


def _flip_code_top_bits(c):
  """int4 codes [64, R] in the WGMMA_UPCAST_4X layout (8 codes per 32-bit
  register) -> the same with each code's top bit flipped: unsigned codes
  u read as int4 become u - 8. One XOR per register."""
  layout = plgpu.Layout.WGMMA_UPCAST_4X

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      c.shape, jnp.int4, layout=layout))
  def flip(_, array):
    i32 = ir.IntegerType.get_signless(32)
    top_bits = arith_dialect.constant(
        i32, ir.IntegerAttr.get(i32, 0x88888888 - (1 << 32)))

    def one(reg):
      word = mgpu.utils.bitcast(reg, i32)
      return mgpu.utils.bitcast(arith_dialect.xori(word, top_bits), reg.type)
    regs = np.vectorize(one, otypes=[object])(array.registers)
    return mgpu.FragmentedArray(_registers=regs, _layout=array.layout,
                                _is_signed=True)
  return flip(c)


def _upcast_registers_as_wgmma(x):
  """[64, N] 16-bit values in the WGMMA_UPCAST_4X layout -> the same
  registers as a [64, N] array in the wgmma layout, no data moved: its
  column c holds column int4_column_order(N)[c] of x (rows unchanged:
  both layouts give a thread the same rows)."""
  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
      return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype,
                                         layout=plgpu.Layout.WGMMA))
  def as_wgmma(_, array):
    layout = mgpu.WGMMA_LAYOUT
    regs = np.empty(layout.registers_shape(array.shape), dtype=object)
    for idx, reg in np.ndenumerate(array.registers):
      for j in range(4):       # 8 columns -> 4 pairs, pair j at tile 4k + j
        regs[(idx[0], 4 * idx[1] + j, *idx[2:])] = mgpu.utils.vector_slice(
            reg, slice(2 * j, 2 * j + 2))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout,
                                _is_signed=None)
  return as_wgmma(x)


def _int4_codes_as_int8(codes):
  """Unsigned 4-bit codes [64, R] in the WGMMA_UPCAST_4X layout (8 per
  32-bit register, read as int4: only the bits count) -> the codes 0..15
  as int8 [64, R] in the wgmma 8-bit layout (signed, as an int8 wgmma's
  register operand must be), columns in `int8_key_column_order(R)`. Two
  instructions per 8 codes, no conversion."""
  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
      return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.int8,
                                         layout=plgpu.Layout.WGMMA_8BIT))
  def widen(_, array):
    i32 = ir.IntegerType.get_signless(32)
    const = lambda v: arith_dialect.constant(i32, ir.IntegerAttr.get(i32, v))
    out_ty = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
    layout = mgpu.WGMMA_LAYOUT_8BIT
    regs = np.empty(layout.registers_shape(array.shape), dtype=object)
    low_nibbles = const(0x0F0F0F0F)
    for idx, reg in np.ndenumerate(array.registers):
      k = idx[1]                          # block of 32 columns
      word = mgpu.utils.bitcast(reg, i32)
      even = arith_dialect.andi(word, low_nibbles)
      odd = arith_dialect.andi(arith_dialect.shrui(word, const(4)),
                               low_nibbles)
      regs[(idx[0], 2 * k, *idx[2:])] = mgpu.utils.bitcast(even, out_ty)
      regs[(idx[0], 2 * k + 1, *idx[2:])] = mgpu.utils.bitcast(odd, out_ty)
    return mgpu.FragmentedArray(_registers=regs, _layout=layout,
                                _is_signed=True)
  return widen(codes)


def _dequant_int4_fused(codes, scales, offsets, dtype, centered=False):
  """Unsigned 4-bit codes [64, R] in the WGMMA_UPCAST_4X layout (8 per
  32-bit register, read as int4: only the bits count) and, per quant
  group n, its scale and offset [64] in the row layout, in `dtype` ->
  c·scale + offset [64, R] in `dtype` (f16 or bf16), in the wgmma layout,
  columns in `int4_fused_column_order(R)` order. Per pair of codes: a
  mask-or under a magic exponent, a packed subtract (exact) and a packed
  fma (one rounding). No scales (empty lists): the mask-or alone, giving
  INT4_MAGIC[dtype] + c (exact), or with `centered` and a packed subtract
  of the magic + 8, c - 8 (exact)."""
  rank = codes.shape[1]
  qg = rank // max(1, len(scales))
  if qg % 32:
    raise ValueError(f"quant groups of {qg} latents: the fused int4 "
                     "routine needs multiples of 32")
  f16 = jnp.dtype(dtype) == jnp.float16
  if not f16 and jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"int4 latents in {jnp.dtype(dtype).name}: f16 or bf16")
  magic = 0x64006400 if f16 else 0x43004300     # 1024 + c or 128 + c
  suffix = "f16x2" if f16 else "bf16x2"
  if scales:
    steps = f"""
            sub.{suffix} t, t, m;
            fma.rn.{suffix} $0, t, $2, $3;"""
  elif centered:     # the magic + 8: 1032 (f16) or 136 (bf16), twice
    steps = f"""
            mov.b32 m, {magic + 0x80008:#x};
            sub.{suffix} $0, t, m;"""
  else:
    steps = """
            mov.b32 $0, t;"""
  row = plgpu.Layout.WGMMA.reduce(1)
  n = len(scales)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,) + (row,) * (2 * n),
      return_type=plgpu.ShapeDtypeStruct(codes.shape, dtype,
                                         layout=plgpu.Layout.WGMMA))
  def dequant(_, array, *rows):
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    const = lambda v: arith_dialect.constant(i32, ir.IntegerAttr.get(i32, v))
    out_ty = ir.VectorType.get((2,), mlir_type(dtype))

    def pair(reg):      # a 16-bit value [1] -> the same value twice, 32 bits
      half = arith_dialect.extui(i32, mgpu.utils.bitcast(reg, i16))
      return arith_dialect.ori(half, arith_dialect.shli(half, const(16)))
    packed = [np.vectorize(pair, otypes=[object])(r.registers) for r in rows]
    layout = mgpu.WGMMA_LAYOUT
    regs = np.empty(layout.registers_shape(array.shape), dtype=object)
    for idx, reg in np.ndenumerate(array.registers):
      m, k, h = idx[0], idx[1], idx[4]   # row tile, block of 32, row half
      group = 32 * k // qg
      word = mgpu.utils.bitcast(reg, i32)
      per_group = ([packed[group][m, 0, h, 0, 0],
                    packed[n + group][m, 0, h, 0, 0]] if n else [])
      for j in range(4):                 # codes j and j + 4 of the 8
        shifted = word if j == 0 else arith_dialect.shrui(word, const(4 * j))
        out = llvm_dialect.inline_asm(
            i32, [shifted] + per_group,
            f"""
            {{
            .reg .b32 t, m;
            mov.b32 m, {magic:#x};
            lop3.b32 t, $1, 0x000F000F, m, 0xea;{steps}
            }}
            """,
            "=r,r,r,r" if n else "=r,r")
        regs[(m, 4 * k + j, *idx[2:])] = mgpu.utils.bitcast(out, out_ty)
    return mgpu.FragmentedArray(_registers=regs, _layout=layout,
                                _is_signed=None)
  return dequant(codes, *scales, *offsets)


# the value the mask-or alone gives a code c: c + this, exact in the dtype
INT4_MAGIC = {jnp.dtype(jnp.bfloat16): 128.0, jnp.dtype(jnp.float16): 1024.0}


def mlir_type(dtype) -> ir.Type:
  """The MLIR type of a 16-bit float dtype (inside a lowering context)."""
  return ir.F16Type.get() if jnp.dtype(dtype) == jnp.float16 else (
      ir.BF16Type.get())


def _reduce_rows(x, scratch, op: str):
  """[64, N] f32 in the wgmma layout -> [N]: `op` ("max" or "add") over the
  rows, through `scratch` (this WG's own f32 buffer): the warp shuffles and
  cross-warp step of Mosaic GPU's reduction, with its two warpgroup
  barriers (named per WG), and nothing shared with another WG."""
  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((x.shape[1],), jnp.float32,
                                         layout=plgpu.Layout.WGMMA.reduce(0)))
  def reduce(_, array, ref):
    return array.reduce(op, 0, scratch=ref)
  return reduce(x, scratch)
