"""The Mosaic GPU latent kernel's launch configuration: `MosaicConfig`, the
predicates that say which of its options act on a shape, the shapes it
refuses (`unsupported_reason`), its shared memory (`smem_bytes`) and the
measured rule that picks a config per shape (`choose_config`). Plain
Python and jnp: no Mosaic GPU import, so the rule is testable anywhere."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pallas_kernels.common import SMEM_BYTES, LatentSpec

COMPUTE_WGS = 2          # compute warpgroups by default
SUB = 64                 # rows per key sub-tile: the wgmma M


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MosaicConfig:
  """Launch parameters: cache rows per tile (64, 128 or 256: a tile is one ring
  slot, one softmax update and one p·h_v product; its keys are rebuilt
  and scored in sub-tiles of 64 rows), ring slots (even: each compute WG
  owns every other slot), sequence splits."""
  block_s: int = 64
  stages: int = 2
  splits: int = 1
  # compute warpgroups taking turns on tiles: 2 (240 registers each) or 3
  # (160 each): more warps to hide each other's stalls (NOTES.md, v10)
  compute_wgs: int = COMPUTE_WGS
  # RoPE keys rotated in packed float16 (keys rounded once, to f16, right
  # after the rebuild; q passed as f16): half the registers of f32 and
  # two elements per instruction. "float32" rotates in f32 and rounds after.
  rotation_dtype: str = "float16"
  # RoPE scores: "rebuild" keys per KV head (K = h_k·B_k, rotate, Sᵀ =
  # K_rot·qᵀ: the tensor work serves every query head of the KV head), or
  # "fold" each query into B_k (U = B_k ⊙ q per rotation pair, [C|D] =
  # h_k·U, s = Σ_i cos·C + sin·D in f32: no key conversion, no score
  # wgmma, but q_per_kv times the tensor work; measured no faster, NOTES.md
  # v9). Fold has no register operand in flight: the base for pipelining.
  rope_mode: str = "rebuild"
  # RoPE, rebuild: KV heads of a latent group served by one CTA (a divisor
  # of the group's heads). Their B_k slices sit side by side in shared
  # memory, each latent tile is read once for all of them (not once per
  # head), the rotation angles are computed once, and one softmax update
  # and one p·h_v product serve all their query heads (N = heads × padded
  # queries): the per-tile chain is paid once per `kv_heads_per_cta` heads.
  kv_heads_per_cta: int = 1
  # kv_heads_per_cta > 1 (16-bit latents, heads × H ≤ 256): one rebuild
  # wgmma for all the CTA's heads (N = heads × H: the h_k sub-tile read
  # once, one wait instead of one per head) and one score wgmma against
  # the queries laid out block-diagonally ([heads·nq, heads·H], zeros off
  # the blocks), instead of a rebuild and a score wgmma per head
  # (SmolLM2: 6 + 6 round trips of ~360-670 cycles per 128 rows). Off:
  # measured no faster on SmolLM2 (39.2 vs 39.3 µs per call) and 2× slower
  # at N = 256 (G-LRD-2, 2 heads: 2,591 vs 1,286 µs, B8 64K: the [64, 256]
  # f32 accumulator takes 128 registers a thread; NOTES.md v14).
  fuse_heads: bool = False
  # R_v not a multiple of 64 (30 % ranks, Fisher ranks in multiples of 16):
  # p·h_v in overlapping 64-row pieces (`value_row_chunks`); compiled tests
  # pass on the H200 (2026-12-03). False sends such shapes to Triton.
  value_pieces: bool = True
  # float8 latent caches, one scale per token and latent group
  # (quant_group = the rank): with RoPE keys rebuilt by an fp8 wgmma with an
  # e4m3 B_k, without RoPE codes upcast to f16 in registers; the scale a
  # row factor of the keys or scores and of P (NOTES.md, v12). Compiled
  # tests pass on the H200 (2026-12-03) and it runs 2.5-15x faster than the
  # Triton fp8 kernel there. False sends float8 caches to Triton.
  fp8_latents: bool = True
  # float8 keys without RoPE (own latent, not shared with the values):
  # scores straight from the e4m3 codes by fp8 wgmmas, the absorbed query
  # split into two e4m3 parts (`e4m3_hi_lo`), instead of upcasting every
  # key tile to f16 on the compute chain. On: compiled tests pass on the
  # H200 since the query's lo part is kept from XLA:GPU's folding
  # (`narrow_values`), and Llama-2 B8 64K G-LRD-4 takes 570 µs vs 733 µs
  # upcast, M-LRD 783 vs 925 µs (NOTES.md v14).
  fp8_scores: bool = True
  # fp8_scores: one f32 accumulator per swizzle-wide chunk of the latents
  # (≤ 128) and per query part, summed in registers, instead of one for
  # all: Hopper's fp8 wgmma accumulates with ~14 bits (DeepSeek-V3 promotes
  # its fp8 GEMM partial sums to f32 every 128 elements for this reason).
  fp8_promote: bool = True
  # packed 4-bit codes without RoPE (an offset and a scale per token and
  # quant group): each compute WG turns a sub-tile of codes into 16-bit
  # latents in registers (Mosaic GPU's int4 -> bf16 conversion, then
  # c·scale + offset per quant group), scores them against the absorbed
  # query and stages the values in its 16-bit tile for p·h_v (NOTES.md,
  # v15). False sends 4-bit caches to Triton.
  int4_latents: bool = True
  # int4: the codes' top bits flipped on whole 32-bit registers (one XOR
  # per 8 codes), so the signed conversion gives c - 8 and the offset
  # takes the 8·scale, instead of a compare-add-select per element pair
  int4_flip: bool = True
  # int4: rows past the length zeroed once, in the WG's value tile of the
  # sequence's last tile (as the 16-bit path does), instead of a select
  # per element in every tile
  int4_mask_last: bool = True
  # float8: the same for float8 values. Their upcast no longer selects the
  # rows past the length in every tile (about 96 SEL a thread a 64-row
  # tile, with the row iota and compare); the value tile is cleared once,
  # in the sequence's last tile, and P's rows past the length are selected
  # to 0 (their value scales may be anything). Llama-2 B8 128K without
  # RoPE 1,123 -> 958 µs, with RoPE 5,674 -> 5,267 µs (NOTES.md, v31).
  fp8_mask_last: bool = True
  # float8 values (own value latent): upcast and mixed in two column
  # windows of R_v (`value_windows`) through one f16 tile per compute WG of
  # a window's width instead of R_v's: about half that tile's shared memory
  # for one more wgmma wait a tile (the second window's upcast waits for
  # the first window's p·h_v, and the value slot is released after it).
  # For shapes that do not fit otherwise: 30 % G-LRD-4 (ranks of 352)
  # needs 237,312 bytes with the whole tile, 4.9 KB over the limit
  # (NOTES.md v35). Lowers for sm_90 (CPU tests); not yet compiled on a GPU,
  # so `choose_config` picks it only with CHOOSE_VALUE_HALVES.
  value_halves: bool = False
  # int4 (quant groups in multiples of 32): codes converted in the layout
  # they load in (8 per 32-bit register) and that layout's registers read
  # as the wgmma layout's, which permutes the columns within each 32
  # (`int4_column_order`); the query's and the output's columns are
  # permuted to match, outside the kernel. Saves the relayout (warp
  # shuffles) of every code tile.
  int4_permuted: bool = True
  # int4 (with int4_permuted): the unsigned nibbles turned into 16-bit
  # latents by an own register routine, two per step: a mask-or puts a
  # pair under a magic exponent (1024 + c in f16, 128 + c in bf16), one
  # packed subtract takes the magic away (exact), one packed fma applies
  # the quant group's scale and offset, rounded once. Replaces the XOR,
  # Mosaic GPU's signed conversion and the separate scale and offset
  # passes (with their f32 -> 16-bit conversions of the offsets). Columns
  # come out in `int4_fused_column_order`.
  int4_fused: bool = True
  # int4 with RoPE: the dequantized key sub-tile is the A operand of the
  # rebuild wgmma (from registers, or from the WG's tile with
  # int4_keys_smem; B_k's rows permuted to the codes' column order in XLA),
  # values staged as without RoPE. False sends these calls to Triton.
  int4_rope: bool = True
  # int4 with RoPE: the dequantized key sub-tile stored to the WG's value
  # tile (free until the tile's values are dequantized) and read from
  # there by the rebuild wgmma, instead of held in registers (64 per
  # thread, next to the rebuild's 64 accumulator registers). Llama-2 B8
  # 64K 4,469 vs 6,405 µs, Llama-3 B8 1,137 vs 1,343 µs (NOTES.md, v17).
  int4_keys_smem: bool = True
  # int4 with RoPE and one scale and offset per token (int4_token_scales,
  # own value latent): the key codes are not dequantized for the rebuild.
  # Two masks per 8 codes make them int8 bytes in registers (the A operand),
  # B_k is int8 with one power-of-two f32 scale per column (β ≥ max |column|
  # / 127: `int8_rebuild_weight` is the B_k a reference uses), and
  # one int8 wgmma (exact int32 sums, twice the bf16 rate) gives c·b; then
  # K = s·β·(c·b) + z·Σ_r β·b per token (scale s, offset z) and column.
  # Compiled tests pass on the H200; off: measured level on G-LRD-4 (Llama-2
  # B8 64K 4,041 vs 4,055 µs) and 17-25 % slower on M-LRD (NOTES.md, v32).
  int4_int8_rebuild: bool = False
  # int4_int8_rebuild: the int8 bytes stored to the WG's own int8 key tile
  # and the wgmma's A read from there (as int4_keys_smem does for the
  # 16-bit keys), instead of taken from registers (4-29 % slower)
  int4_int8_keys_smem: bool = True
  # int4 without RoPE, one scale and offset per token (int4_token_scales),
  # own key latent: the keys are not dequantized. The mask-or alone gives
  # M + c (M = 128 in bf16, 1024 in f16; exact), the score wgmma takes
  # that, and per row s = scale·(q·(M + c)) + (offset - M·scale)·Σq, with
  # Σq the absorbed query's column sums (f32 of the bf16 values the wgmma
  # reads). One lop3 per code pair instead of lop3 + sub + fma.
  int4_raw_keys: bool = True
  # v27 (with int4_raw_keys): the values not dequantized either. Their tile
  # gets the centered codes c - 8 (mask-or and packed subtract of the
  # magic + 8: exact and finite, so no mask past the length); each
  # probability is scaled by its token's value scale before the 16-bit
  # rounding (p·scale), and per query column e = Σ_t p·(offset + 8·scale)
  # (f32) is added to the accumulator at the end. Takes the fma of every
  # value code pair and the per-row scale and offset broadcasts off the
  # compute WGs' chain. Centered, the rounding of p·scale weighs |c - 8|
  # ≤ 8, and the error is below the dequantizing path's (CPU test);
  # M + c (no subtract) would be 1.6× (bf16) to 7× (f16) above it.
  int4_raw_values: bool = True
  # v28 (with int4_raw_keys, tiles of several 64-row sub-tiles): every
  # sub-tile's score wgmma is issued before the first one is waited on, so
  # the next sub-tile's codes are loaded and converted while the previous
  # one's wgmma runs. Off: correct (compiled tests) but slower, ptxas
  # spills with both sub-tiles' operands live (Llama-2 B8 128K 1,049 vs
  # 814 µs, Llama-3 419 vs 293; NOTES.md v28).
  int4_scores_together: bool = False
  # float8 and int4 without RoPE (own value latent): the tile's values
  # upcast or dequantized into the WG's 16-bit tile between the issue of
  # its last score wgmma and the wait for it (to overlap the tensor core)
  # instead of after the softmax. Off: measured mixed, int4 mostly slower
  # (Llama-2 B8 64K, one scale per token, 569 vs 497 µs; fp8 546 vs 575;
  # NOTES.md, v19); compiled tests pass.
  values_during_scores: bool = False
  # int4 without RoPE (own value latent): a converter warpgroup (a fourth
  # one) dequantizes each tile's values into a ring of 16-bit tiles
  # (`VALUE_RING_PER_WG` per compute WG) that the compute WGs' p·h_v reads,
  # so the values' dequantization leaves their chain; registers: producer
  # 24, compute and converter WGs 160 each. Off: correct (compiled tests)
  # but measured slower (Llama-2 B8 64K 567 vs 496 µs, NOTES.md v20): one
  # converter WG takes 1,943 cycles a tile where the CTA would finish one
  # every ≈ 1,213 (profiled, NOTES.md "int4 converter, profiled").
  int4_converter: bool = False
  # v26: with int4_converter, 2 converter WGs, converter c taking the
  # tiles t ≡ c (mod 2), i.e. feeding compute WG c (each barrier then has
  # one waiting WG, as the ring's phase tracking needs); registers per
  # thread from _CONVERTER_REGISTERS[2]. Correct (compiled tests) but
  # slower: Llama-2 B8 128K 1,072 µs (1,015 at 24 / 128 / 96) against 959
  # without converters (NOTES.md v26).
  int4_converters: int = 1
  # v13: each compute WG reduces over its rows (the softmax max) through a
  # shared-memory scratch of its own (Mosaic GPU's reduction, called inline),
  # not through Pallas's one scratch per kernel: no turns between the WGs;
  # and the softmax sum is kept as per-thread partials [rows, N] until the
  # end (one cross-warp reduction per tile instead of two, NOTES.md v13).
  private_reductions: bool = True
  # v24 (off: measured slower or level, NOTES.md v24): the split partials
  # merged in the kernel instead of in XLA. Every compute WG stores its
  # partial as before and signals a semaphore of its (batch, program); the
  # last WG of the program's last split (the last to be dispatched, so the
  # others are resident or done: no deadlock) waits for the others'
  # signals, merges all partials from global memory (L2) and stores the
  # merged rows behind them, so XLA keeps one transpose and drops the
  # merge's kernels (Llama-2 B1 64K no RoPE G-LRD-4: 13.0 → 5.3 µs of XLA
  # work), but that WG's reads add 5-6 µs to the kernel's tail: span 135.2
  # → 133.4 µs there, Llama-3 M-LRD RoPE 50.7 → 53.8 µs. At most
  # MERGE_IN_KERNEL_PARTS partials: one WG reads them all.
  merge_in_kernel: bool = False
  # v29: the compute WGs of a CTA merge their partials before they leave
  # it (the last WG stores its partial and arrives on a barrier; the one
  # before it loads that partial back from L2, merges it with its own in
  # registers and stores over it; down to WG 0), so a split stores one
  # partial instead of one per WG and XLA merges half as many. It lengthens
  # every CTA's tail, so it pays only where a split is long: choose_config
  # turns it on up to MERGE_WGS_SPLITS splits (Llama-2 B1 64K G-LRD-2 RoPE,
  # 8 splits, 177 vs 184 µs; Llama-3 G-LRD-2 RoPE, 33 splits, 68 vs 63 µs;
  # NOTES.md v29).
  merge_wgs: bool = False
  # v30, RoPE keys rebuilt from 16-bit or float8 latents (not fused):
  # each compute WG issues tile i's first rebuild wgmma (sub-tile 0, the
  # CTA's first KV head) and runs tile i - 1's softmax, values, P store and
  # p·h_v while the tensor core rebuilds, instead of waiting for the
  # rebuild first (a software pipeline of depth one; both operands of the
  # rebuild are in shared memory, so nothing in registers is read while it
  # is in flight). Off: correct (compiled tests) but slower on every RoPE
  # row (Llama-2 B8 64K G-LRD-2 1,372 vs 1,290 µs, G-LRD-4 2,547 vs 2,298,
  # fp8 3,333 vs 2,831): the wait for the previous tile's p·h_v wgmma also
  # waits for the rebuild issued before it, so only its softmax and P
  # store overlap, and ptxas spills more (NOTES.md v30).
  rebuild_early: bool = False
  # Mosaic GPU's in-kernel profiler (eval/profile_kernel.py): the named
  # stages of each tile (`jax.named_scope` below) timed in SM cycles per
  # warpgroup, at most `profile_space` ranges each, written as a trace
  # into `profile_dir`. Off (0, "") in normal runs: it costs shared memory.
  profile_space: int = 0
  profile_dir: str = ""


# merge_wgs: on (choose_config) up to this many splits (NOTES.md v29)
MERGE_WGS_SPLITS = 8

# merge_in_kernel: the most split partials one WG merges (its reads of
# [P, R_v, cols] f32 are the tail of the kernel's last CTA)
MERGE_IN_KERNEL_PARTS = 32

# the producer WG's registers a thread, per compute WG count. With two
# compute WGs it had 40 (as JAX's attention_mgpu), leaving them 232, and
# ptxas spilled in their code (Llama-3 B8 int4 per token 312 bytes, G-LRD-2
# RoPE 76): 24 leaves them 240 (24 + 2·240 = 3·168, the launch pool),
# fewer spills; Llama-3 B8 128K int4 RoPE 7.7 % faster, fp8 RoPE and int4
# no RoPE 2.7 %, other rows within ±1 % (NOTES.md, "Registers")
_PRODUCER_REGISTERS = {2: 24, 3: 24}
# with converter WGs (int4_converter), per converter count: producer,
# compute and converter registers a thread. The WGs trade registers within
# what the launch gave the CTA (`launch_registers` a thread): 4 WGs get 128
# each (24 + 2·160 + 160 ≤ 512); 5 WGs only 96 (640 threads; 65536 / 640
# rounded down to the allocation unit of 8), so 24 + 2·C + 2·V ≤ 480: the
# tenth session's (24, 136, 104) asked for 504 and the increases waited
# forever (the eleventh session's compiled tests hung there)
_CONVERTER_REGISTERS = {1: (24, 160, 160), 2: (24, 136, 88)}
VALUE_RING_PER_WG = 2          # 16-bit value tiles per compute WG


def launch_registers(wgs: int) -> int:
  """Registers a thread that a CTA of `wgs` 128-thread WGs launches with:
  the 64K register file shared evenly, in the allocation unit of 8 (the
  pool that `setmaxnreg` moves registers within)."""
  return 65536 // (128 * wgs) // 8 * 8


def _compute_registers(n_wgs: int, converters: int = 0) -> int:
  """Registers per compute thread: what the producer leaves of the
  launch's pool (`launch_registers` · WGs), in multiples of 8 (with
  converter WGs, from their table)."""
  if converters:
    return _CONVERTER_REGISTERS[converters][1]
  free = launch_registers(n_wgs + 1) * (n_wgs + 1) - _PRODUCER_REGISTERS[n_wgs]
  return min(240, free // n_wgs // 8 * 8)


def int4_converter(spec: LatentSpec, rope: bool, config: MosaicConfig
                   ) -> bool:
  """Whether a converter WG dequantizes the values (int4 without RoPE,
  own value latent, 2 compute WGs; `MosaicConfig.int4_converter`)."""
  return (config.int4_converter and spec.bits == 4 and not rope
          and not spec.shared and config.compute_wgs == 2)


def converter_wgs(spec: LatentSpec, rope: bool, config: MosaicConfig
                  ) -> int:
  """How many converter WGs the kernel runs (0 without `int4_converter`)."""
  return config.int4_converters if int4_converter(spec, rope, config) else 0


def values_during_scores(spec: LatentSpec, rope: bool, config: MosaicConfig
                         ) -> bool:
  """Whether a tile's values are staged while its last score wgmma runs
  (`MosaicConfig.values_during_scores`: float8 and int4 without RoPE, own
  value latent, no converter WG)."""
  return (config.values_during_scores and spec.bits in (4, 8) and not rope
          and not spec.shared and not int4_converter(spec, rope, config))


def value_halves(spec: LatentSpec, rope: bool, config: MosaicConfig
                 ) -> bool:
  """Whether float8 values go through two column windows of a narrower
  tile (`MosaicConfig.value_halves`; own value latent)."""
  return config.value_halves and spec.bits == 8 and not spec.shared


def _window_width(v_rank: int) -> int | None:
  """The width of `value_windows`, or None where R_v has none."""
  tile = _swizzle(v_rank, 1)
  for width in range(SUB * -(-v_rank // (2 * SUB)), v_rank, SUB):
    if (v_rank - width) % tile == 0:
      return width
  return None


def value_windows(v_rank: int) -> tuple[tuple[int, int], ...]:
  """(first column, width) of the two column windows of R_v that
  `value_halves` upcasts and mixes in turn: the same width, a multiple of
  64 (each window is one p·h_v accumulator, M = width), the smallest ≥
  R_v / 2 whose second window, which ends at R_v, starts on a swizzle
  tile of the 1-byte codes; where R_v / 2 is not such a width the windows
  overlap (their common rows get the same sums, so either copy is right).
  352 -> ((0, 192), (160, 192)); 256 -> ((0, 128), (128, 128))."""
  width = _window_width(v_rank)
  if width is None:
    raise ValueError(f"v_rank {v_rank} has no two windows narrower than it "
                     f"(multiples of {SUB}, the second on a "
                     f"{_swizzle(v_rank, 1)}-byte swizzle tile)")
  return ((0, width), (v_rank - width, width))


def _has_value_windows(v_rank: int) -> bool:
  return _window_width(v_rank) is not None


def value_tile_cols(spec: LatentSpec, rope: bool, config: MosaicConfig
                    ) -> int:
  """Columns of each compute WG's 16-bit value tile: R_v, or one window's
  width with `value_halves` (R_v where it has no windows:
  `unsupported_reason` refuses that)."""
  width = (_window_width(spec.v_rank) if value_halves(spec, rope, config)
           else None)
  return spec.v_rank if width is None else width


def scores_dtype(config: MosaicConfig, dtype):
  """Operand type of the RoPE scores wgmma (rotated keys and q)."""
  return jnp.dtype(jnp.float16 if config.rotation_dtype == "float16" else
                   dtype)


def _swizzle(minor_elems: int, itemsize: int = 2) -> int:
  """Largest TMA/wgmma swizzle (bytes) whose row fits minor_elems evenly."""
  for sw in (128, 64, 32):
    if (minor_elems * itemsize) % sw == 0:
      return sw
  raise ValueError(f"a row of {minor_elems} elements has no swizzle")


def query_cols(spec: LatentSpec, rope: bool) -> int:
  """Query heads per program, padded to the wgmma N granule of 8."""
  n = spec.q_per_kv if rope else spec.heads_per_group
  return 8 * -(-n // 8)


def value_row_chunks(v_rank: int) -> tuple[tuple[int, int], ...]:
  """(offset, rows) of the p·h_v accumulator pieces: all R_v rows at once
  when R_v is a multiple of 64 (the wgmma M), else 64-row pieces with the
  last one ending at R_v, overlapping its neighbour (their common rows get
  the same sums, so either copy is right)."""
  if v_rank % SUB == 0:
    return ((0, v_rank),)
  offsets = list(range(0, v_rank - SUB, SUB)) + [v_rank - SUB]
  return tuple((o, SUB) for o in offsets)


def heads_per_cta(rope: bool, config: MosaicConfig) -> int:
  """KV heads one CTA serves with RoPE (1 without: B_k is in the query)."""
  return config.kv_heads_per_cta if rope else 1


def fused_heads(spec: LatentSpec, rope: bool, config: MosaicConfig) -> bool:
  """Whether the CTA's KV heads share one rebuild and one score wgmma."""
  hc = heads_per_cta(rope, config)
  return (config.fuse_heads and rope and config.rope_mode == "rebuild"
          and hc > 1 and spec.bits == 16 and hc * spec.head_dim <= 256)


def rebuild_early(spec: LatentSpec, rope: bool, config: MosaicConfig
                  ) -> bool:
  """v30 (`MosaicConfig.rebuild_early`) on this path: RoPE keys rebuilt
  from 16-bit or float8 latents, heads not fused."""
  return (config.rebuild_early and rope and config.rope_mode == "rebuild"
          and spec.bits != 4 and not fused_heads(spec, rope, config))


def int8_rebuild(spec: LatentSpec, rope: bool, config: MosaicConfig
                 ) -> bool:
  """Whether the int4 RoPE keys are rebuilt from their codes by an int8
  wgmma (`MosaicConfig.int4_int8_rebuild`)."""
  return (config.int4_int8_rebuild and rope and spec.bits == 4
          and config.rope_mode == "rebuild" and not spec.shared
          and int4_token_scales(spec))


def fp8_scores(spec: LatentSpec, rope: bool, config: MosaicConfig) -> bool:
  """Whether the no-RoPE scores come straight from e4m3 key codes."""
  return (config.fp8_scores and spec.bits == 8 and not rope
          and not spec.shared)


def split_spans(cache_len: int, config: MosaicConfig) -> tuple[int, int]:
  """The sequence splits the kernel runs and the rows of each: spans of
  ⌈tiles / config.splits⌉ whole tiles, so fewer splits than asked where
  the tiles do not divide evenly."""
  blocks = cache_len // config.block_s
  per = -(-blocks // config.splits)
  return -(-blocks // per), per * config.block_s


def unsupported_reason(spec: LatentSpec, dtype, cache_len: int, rope: bool,
                       config: MosaicConfig) -> str | None:
  """Why this kernel cannot run a shape (None if it can)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (Mosaic GPU path takes bf16/fp16)"
  if spec.bits == 8:
    if not config.fp8_latents:
      return "8-bit latents with MosaicConfig(fp8_latents=False)"
    if rope and config.rope_mode != "rebuild":
      return "float8 latents with rope_mode 'fold' (rebuild only)"
    if spec.quant_group != spec.k_rank or (
        not spec.shared and spec.quant_group != spec.v_rank):
      return (f"quant_group {spec.quant_group} (float8 needs one scale per "
              f"token and latent group: quant_group = the rank)")
    if spec.k_rank % 32 or spec.v_rank % 32:
      return "float8 ranks not multiples of 32 (the 1-byte swizzle)"
    if rope and spec.k_up_bits != 8:
      # the fp8 rebuild rounds B_k to e4m3; a model that keeps it in 16
      # bits would decode with other keys than its perplexity measures
      return ("float8 latents with RoPE and a 16-bit B_k (the kernel "
              "rebuilds keys with an e4m3 B_k: compress with --k-up-bits 8 "
              "to decode on it)")
  elif spec.bits == 4:
    if rope and not config.int4_rope:
      return "4-bit latents with RoPE and MosaicConfig(int4_rope=False)"
    if rope and config.rope_mode != "rebuild":
      return "4-bit latents with rope_mode 'fold' (rebuild only)"
    if (rope and config.int4_keys_smem and spec.k_rank != spec.v_rank
        and not int8_rebuild(spec, rope, config)):
      return (f"int4_keys_smem with k_rank {spec.k_rank} != v_rank "
              f"{spec.v_rank} (the keys borrow the value tile)")
    if not config.int4_latents:
      return "4-bit latents with MosaicConfig(int4_latents=False)"
    qg = spec.quant_group
    if qg % 16 or spec.k_rank % qg or spec.v_rank % qg:
      return (f"quant_group {qg} (needs a multiple of 16 dividing both "
              "ranks)")
    if spec.k_rank % 64 or spec.v_rank % 64:
      return "4-bit ranks not multiples of 64 (a 32-byte swizzled code row)"
    if not int4_token_scales(spec) and any(
        (r // qg) % 8 for r in (spec.k_rank, spec.v_rank)):
      return (f"rank / quant_group not a multiple of 8 (a tile's scales "
              f"and offsets are TMA rows of ≥ 16 bytes; ranks "
              f"{spec.k_rank}/{spec.v_rank}, quant_group {qg})")
  elif spec.bits != 16:
    return (f"{spec.bits}-bit latents (Mosaic GPU path reads 16-bit, float8 "
            "or, without RoPE, 4-bit latents)")
  if config.value_halves:
    if not value_halves(spec, rope, config):
      return "value_halves takes float8 caches with an own value latent"
    if values_during_scores(spec, rope, config):
      return ("value_halves with values_during_scores (the windows are "
              "staged after the softmax)")
    try:
      value_windows(spec.v_rank)
    except ValueError as err:
      return f"value_halves: {err}"
  if spec.v_rank % 16 or spec.v_rank < SUB:
    return (f"v_rank {spec.v_rank} (needs a multiple of 16, at least 64: "
            "p·h_v takes 64-row pieces of it)")
  if spec.v_rank % SUB and not config.value_pieces:
    return (f"v_rank {spec.v_rank} (not a multiple of 64, with "
            "MosaicConfig(value_pieces=False))")
  if spec.k_rank % 16:
    return f"k_rank {spec.k_rank} (needs a multiple of 16)"
  if rope and spec.head_dim % 32:
    return f"head_dim {spec.head_dim} (needs a multiple of 32)"
  hc = heads_per_cta(rope, config)
  if hc < 1 or spec.kv_per_group % hc:
    return (f"kv_heads_per_cta {hc} (a divisor of kv_per_group="
            f"{spec.kv_per_group})")
  if hc > 1 and config.rope_mode != "rebuild":
    return f"kv_heads_per_cta {hc} with rope_mode {config.rope_mode!r}"
  if query_cols(spec, rope) * hc > 256:
    return "more than 256 query columns per program"
  if config.block_s not in (SUB, 2 * SUB, 4 * SUB):
    return f"block_s {config.block_s} (64, 128 or 256)"
  if cache_len % config.block_s:
    return (f"cache length {cache_len} (needs a multiple of block_s="
            f"{config.block_s})")
  if config.rotation_dtype not in ("float16", "float32"):
    return f"rotation_dtype {config.rotation_dtype!r} (float16 or float32)"
  if config.rope_mode not in ("rebuild", "fold"):
    return f"rope_mode {config.rope_mode!r} (rebuild or fold)"
  if config.compute_wgs not in (2, 3):
    return f"compute_wgs {config.compute_wgs} (2 or 3)"
  if config.int4_converters not in (1, 2):
    return f"int4_converters {config.int4_converters} (1 or 2)"
  if config.stages % config.compute_wgs:
    return (f"stages {config.stages} (needs a multiple of compute_wgs="
            f"{config.compute_wgs}: each WG owns every W-th ring slot)")
  if (rebuild_early(spec, rope, config) and spec.shared
      and config.stages < 2 * config.compute_wgs):
    # a shared latent's slot holds tile i - 1's values until its tail,
    # which now runs after tile i's key wait
    return (f"rebuild_early with a shared latent and stages "
            f"{config.stages} (needs two ring slots per compute WG)")
  if smem_bytes(spec, rope, config) > SMEM_BYTES:
    profiler = profile_smem_bytes(spec, rope, config)
    note = (f"; the profiler's buffers for profile_space="
            f"{config.profile_space} take {profiler}" if profiler else "")
    return (f"{smem_bytes(spec, rope, config)} bytes of shared memory "
            f"(limit {SMEM_BYTES}{note})")
  return merge_in_kernel_refused(config, split_spans(cache_len, config)[0])


def stored_parts(config: MosaicConfig, splits: int) -> int:
  """Split partials the kernel stores per program: one per split with
  `merge_wgs`, else one per split and compute WG."""
  return splits if config.merge_wgs else config.compute_wgs * splits


def merge_in_kernel_refused(config: MosaicConfig, splits: int) -> str | None:
  """Why `merge_in_kernel` cannot take `splits` splits (None if it can or
  is off)."""
  parts = stored_parts(config, splits)
  if config.merge_in_kernel and parts > MERGE_IN_KERNEL_PARTS:
    return (f"merge_in_kernel with {parts} split partials (at most "
            f"{MERGE_IN_KERNEL_PARTS}: one warpgroup reads them all)")
  return None


# Mosaic GPU's in-kernel profiler keeps, for every warpgroup, profile_space
# ranges in shared memory: two events of two 4-byte entries each
PROFILE_BYTES_PER_RANGE = 16


def profile_smem_bytes(spec: LatentSpec, rope: bool,
                       config: MosaicConfig) -> int:
  """Shared memory of the profiler's buffers (0 when not profiling)."""
  wgs = config.compute_wgs + 1 + converter_wgs(spec, rope, config)
  return PROFILE_BYTES_PER_RANGE * wgs * config.profile_space


def smem_bytes(spec: LatentSpec, rope: bool, config: MosaicConfig) -> int:
  """Shared memory the kernel allocates (2-byte elements), the profiler's
  buffers included."""
  bs, nq = config.block_s, query_cols(spec, rope)
  hc = heads_per_cta(rope, config)
  ring = bs * (spec.k_rank + (0 if spec.shared else spec.v_rank))
  fp8 = spec.bits == 8
  if fp8:   # 1-byte codes; 16-bit scales per token; each WG's f16 values
    # (with value_halves one window wide)
    ring = ring // 2 + 2 * bs
    extra = config.compute_wgs * bs * value_tile_cols(spec, rope, config)
  elif spec.bits == 4:   # packed codes; a scale and an offset per quant
    # group; each WG's 16-bit values
    sides = (spec.k_rank,) + (() if spec.shared else (spec.v_rank,))
    ring = ring // 4 + 2 * bs * sum(r // spec.quant_group for r in sides)
    extra = config.compute_wgs * bs * spec.v_rank
    if int4_converter(spec, rope, config):   # the 16-bit value ring
      extra *= VALUE_RING_PER_WG
  else:
    extra = 0
  fixed = config.compute_wgs * hc * nq * bs              # Pᵀ per WG
  if rope and config.rope_mode == "fold":
    hh, qk = spec.head_dim // 2, spec.q_per_kv
    fixed += qk * spec.k_rank * 2 * hh + (1 + 2 * qk) * hh * 2  # U, f32s
    fixed += config.stages * (bs // SUB) * 2 * hh * 2  # cos/sin rows (f32)
  elif rope:
    hh = spec.head_dim // 2
    # B_k (e4m3 with fp8 latents, int8 with int4_int8_rebuild), q, then
    # the f32 rows: inv_freq, bias halves (and B_k's column scales; int8:
    # and its column sums)
    i8 = int8_rebuild(spec, rope, config)
    b_units = spec.k_rank * hh if fp8 or i8 else 2 * spec.k_rank * hh
    # q per head [nq, H], or block-diagonal [hc·nq, hc·H] when fused
    q_units = 2 * nq * hh * (hc if fused_heads(spec, rope, config) else 1)
    vec_rows = 5 if fp8 else 7 if i8 else 3
    fixed += hc * (b_units + q_units + vec_rows * hh * 2)
    if i8 and config.int4_int8_keys_smem:   # each WG's int8 key tile
      fixed += config.compute_wgs * SUB * spec.k_rank // 2
    fixed += config.stages * (bs // SUB) * 2 * hh * 2  # cos/sin rows (f32)
  else:
    fixed += nq * spec.k_rank
    if raw_int4_keys(spec, rope, config):
      fixed += 2 * (nq + -nq % 32)              # Σq per column (f32)
  unused = 8 * 64 if spec.shared else 0    # the placeholder value ring
  if spec.shared and spec.bits == 4:       # and value scale rings (1 KB:
    unused += 2 * 512                      # the 1024-byte alignment)
  # each compute WG's reduction scratch (f32)
  fixed += config.compute_wgs * reduction_scratch_elems(hc * nq) * 2
  # + Pallas's cross-warp reduction scratch (2 KB by default) and 1 KB for
  # barriers and alignment (SmolLM2's shared latent measured 2840 bytes
  # above the buffers alone: a config at the limit failed to compile)
  return (2 * (config.stages * ring + fixed + unused + extra) + 2048 + 1024
          + profile_smem_bytes(spec, rope, config))


# value_halves (v35) lowers for sm_90 but has not been compiled and tested
# on a GPU: until then choose_config leaves it off, and shapes that need it
# fall back (30 % G-LRD-4 float8: to the jnp reference)
CHOOSE_VALUE_HALVES = False


def choose_config(spec: LatentSpec, *, batch: int, cache_len: int, rope: bool,
                  n_sms: int = 132, compute_wgs: int = COMPUTE_WGS,
                  kv_heads_per_cta: int | None = None) -> MosaicConfig:
  """Tiles of 128 rows where one ring slot per compute WG fits (a softmax
  update and its cross-warp reduction then serve twice the rows;
  eval/results/profile_kernel_h200.md), else 64 — and 64 with several KV
  heads per CTA where only 64-row tiles get two slots per WG; 256 without
  RoPE for float8 or raw int4 codes where one slot per WG fits; two slots
  per WG where they fit; splits so that the grid fills the GPU in one wave
  at most (one CTA per SM: the ring takes its shared memory and the
  registers), each
  split still walking one tile per compute WG and, with RoPE, at least
  2·k_rank rows (its B_k slice is loaded once per CTA).

  Split counts measured on the H200 (eval/results/
  bench_kernels_h200_splits.txt, Llama-3-8B B1 4K, 50 %): G-LRD-4 RoPE best
  at 8 splits of 512 rows (43 µs; 16 splits 51 µs), M-LRD RoPE at 16 of
  256 (35 µs; the earlier ≥ 4-tiles-per-WG rule picked 4: 51 µs), no RoPE
  at one tile per WG (G-LRD-4 32 splits 31 µs vs 42 µs at 8). SmolLM2
  (48 RoPE programs, B16 8K): 2 splits (one wave) beat 3–16 (87 vs 92–115
  µs).

  KV heads per CTA (RoPE, 16-bit latents; `kv_heads_per_cta` None:
  chosen): all of the group's where they fit — with a shared latent in one
  ring slot per WG (SmolLM2, device time of the kernel, eval/results/
  profile_smollm2_h*.md: 53 µs with one head per CTA and 2 splits, 39 µs
  with 3 heads and 8 splits), with their own value latent in two 64-row
  slots per WG (G-LRD-2 on the Llama-2 shape, GPU timeline per call, NOTES.md
  v14: B8 64K 1,286 vs 1,405 µs with one head, B1 182 vs 196 µs); one
  otherwise (G-LRD-4's B_k slices do not fit twice; float8 codes with
  several heads have not run).

  The compute WGs merge their partials in the kernel (`merge_wgs`) up to
  MERGE_WGS_SPLITS splits; a caller who replaces `splits` keeps the
  choice made for the chosen count. float8 values in two column windows
  (`value_halves`) only with CHOOSE_VALUE_HALVES, and only where the whole
  value tile does not fit at 64 rows."""
  # "fold" measured no faster than "rebuild" on the H200 (NOTES.md, v9)
  # and rounds q·B_k to 16 bits: rebuild is the default
  mode = "rebuild"
  w = compute_wgs
  fits = lambda bs, st, hc, halves=False: smem_bytes(spec, rope, MosaicConfig(
      block_s=bs, stages=st, rope_mode=mode, compute_wgs=w,
      kv_heads_per_cta=hc, value_halves=halves)) <= SMEM_BYTES
  hc = kv_heads_per_cta
  if hc is None:
    whole = spec.kv_per_group
    # (16-bit latents: several heads with float8 codes have not run)
    hc = (whole if rope and spec.bits == 16 and whole > 1
          and fits(SUB, w if spec.shared else 2 * w, whole)
          and query_cols(spec, rope) * whole <= 256 else 1)
  fits = functools.partial(fits, hc=hc)
  halves = (CHOOSE_VALUE_HALVES
            and value_halves(spec, rope, MosaicConfig(value_halves=True))
            and not fits(SUB, w) and _has_value_windows(spec.v_rank)
            and fits(SUB, w, halves=True))
  if halves:
    # float8 values whose whole 16-bit tile per WG does not fit even at 64
    # rows in one slot per WG (30 % G-LRD-4): two windows of it
    fits = functools.partial(fits, halves=True)
  bs = 2 * SUB if cache_len % (2 * SUB) == 0 and fits(2 * SUB, w) else SUB
  if (spec.bits == 4 and not rope
      and not raw_int4_values(spec, rope, MosaicConfig())):
    # 4-bit codes: the WG's dequantization chain is long, and 64-row tiles
    # in more slots keep loads in flight (Llama-2-7B G-LRD-4 B8 64K: 693 µs
    # with 64 rows vs 749 µs with 128, eval/results/
    # bench_kernels_h200_int4.md). With the values not dequantized
    # (int4_raw_values) 128-row tiles in 2 slots win instead: Llama-2 B8
    # 128K 813 vs 963 µs, B1 64K 64.8 vs 72.8 µs (NOTES.md v27)
    bs = SUB
  if (not rope and not spec.shared and cache_len % (4 * SUB) == 0
      and (spec.bits == 8 or raw_int4_values(spec, rope, MosaicConfig()))
      and fits(4 * SUB, w)):
    # 1-byte or raw 4-bit codes without RoPE: the chain's per-tile part
    # (the column max across warps, P's store, the p·h_v round trip)
    # outweighs the per-row part, so 256-row tiles in one slot per WG win
    # where they fit (50 %, NOTES.md v34: float8 M-LRD Llama-2 B8 64K 762
    # vs 655 µs, Llama-3 189 vs 174; int4 with a scale per token M-LRD 747
    # vs 642 and 200 vs 174, G-LRD-2 540 vs 438 and 146 vs 124)
    bs = 4 * SUB
  if (bs == 2 * SUB and hc > 1 and not fits(bs, 2 * w)
      and fits(SUB, 2 * w)):
    # several heads per CTA: each WG's tile chain is long, and with one
    # 128-row slot per WG it waits for every tile's load (SmolLM2, B16 8K,
    # 3 heads: 3.6K of 18K cycles per tile; 64-row tiles in two slots per
    # WG 65.6 µs vs 72.5 µs per call, eval/results/
    # bench_kernels_h200_smollm2_v13.md)
    bs = SUB
  # (256 rows: two slots per WG, where they fit, ran slower than one:
  # float8 M-LRD Llama-2 B8 64K 802 vs 655 µs, Llama-3 200 vs 174; NOTES.md
  # v34)
  stages = 2 * w if fits(bs, 2 * w) and bs < 4 * SUB else w
  programs = batch * spec.groups * (spec.kv_per_group // hc if rope else 1)
  tiles = max(1, cache_len // bs)
  # one full wave: 32 programs × 5 splits = 160 CTAs on 132 SMs ran a
  # second, nearly empty wave (Llama-2-7B G-LRD-4, batch 1, on the H200)
  want = max(1, n_sms // programs)
  min_rows = max(w * bs, 2 * spec.k_rank if rope else 0)
  splits = max(1, min(want, tiles * bs // min_rows))
  return MosaicConfig(block_s=bs, stages=stages, splits=splits,
                      rope_mode=mode, compute_wgs=w, kv_heads_per_cta=hc,
                      merge_wgs=splits <= MERGE_WGS_SPLITS,
                      value_halves=halves)


def reduction_scratch_elems(cols: int) -> int:
  """f32 elements of one compute WG's reduction scratch for [64, cols]
  reduced over its rows: 256 per 8 columns (4 warps x 32 lanes x 2), at
  most 4 x 256 (wider arrays reduce in several rounds)."""
  return 256 * min(cols // 8, 4)


def permuted_int4(spec: LatentSpec, config: MosaicConfig) -> bool:
  """Whether the int4 path reads its codes with permuted columns."""
  return (config.int4_permuted and spec.bits == 4
          and spec.quant_group % 32 == 0)


def int4_token_scales(spec: LatentSpec) -> bool:
  """Whether a 4-bit cache has one scale and offset per token and latent
  group (quant_group = the rank on every side): a tile's scales are then
  one TMA row of [tile] values per side, token-major as float8's, and each
  thread loads two per sub-tile (its rows) instead of one per row and
  quant group."""
  return (spec.bits == 4 and spec.quant_group == spec.k_rank
          and (spec.shared or spec.v_rank == spec.quant_group))


def raw_int4_keys(spec: LatentSpec, rope: bool, config: MosaicConfig
                  ) -> bool:
  """Whether the no-RoPE int4 path scores the keys' magic values (M + c)
  and corrects per row (`MosaicConfig.int4_raw_keys`)."""
  return (config.int4_raw_keys and not rope and not spec.shared
          and int4_token_scales(spec) and fused_int4(spec, config))


def raw_int4_values(spec: LatentSpec, rope: bool, config: MosaicConfig
                    ) -> bool:
  """Whether the no-RoPE int4 path multiplies P (scaled per token) by the
  values' centered codes c - 8 and corrects per column
  (`MosaicConfig.int4_raw_values`; not with converter WGs, which write
  dequantized values)."""
  return (config.int4_raw_values and raw_int4_keys(spec, rope, config)
          and not int4_converter(spec, rope, config))


def int4_scores_together(spec: LatentSpec, rope: bool, config: MosaicConfig
                         ) -> bool:
  """Whether a tile's raw int4 score wgmmas are all issued before the
  first is waited on (`MosaicConfig.int4_scores_together`; tiles of more
  than one sub-tile)."""
  return (config.int4_scores_together and config.block_s > SUB
          and raw_int4_keys(spec, rope, config))


def fused_int4(spec: LatentSpec, config: MosaicConfig) -> bool:
  """Whether the int4 path dequantizes by `_dequant_int4_fused`."""
  return permuted_int4(spec, config) and config.int4_fused
