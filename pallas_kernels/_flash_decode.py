"""The flash-decoding loop both latent kernels share.

Grid (B, G, P): program (b, g, p) owns cache rows [p·span, (p+1)·span) of
sequence b and the query heads of latent group g. It walks those rows in
tiles of `block_s` up to the sequence's length, reads (and dequantizes) the
group's latents once per tile, scores them with `score_fn`, and keeps an
online softmax and the latent mix p·h_v in registers. The P partials are
merged by `common.combine_splits` outside the kernel (split-K), so a single
long sequence still fills the GPU.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (KernelConfig, LatentSpec, cache_sides,
                                   combine_splits, dot, load_latent_pieces,
                                   piece_layout, split_hi_lo)

_FLOOR = -1e30  # finite "minus infinity": masked rows never produce NaN


def _kernel(lengths_ref, *refs, spec: LatentSpec, config: KernelConfig,
            n_query: int, n_k: int, n_v: int, span: int, heads: int,
            k_width: int, v_width: int, score_fn: Callable, dtype):
  query_refs = refs[:n_query]
  k_refs = refs[n_query:n_query + n_k]
  v_refs = refs[n_query + n_k:n_query + n_k + n_v]
  acc_ref, m_ref, l_ref = refs[n_query + n_k + n_v:]
  b, g, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bs = config.block_s
  length = lengths_ref[b]
  start = p * span
  n_blocks = jnp.clip(pl.cdiv(length - start, bs), 0, span // bs)
  k_layout = piece_layout(spec, spec.k_rank)
  v_layout = piece_layout(spec, spec.v_rank)
  k_rows = [pl.ds(c0, n, stride) for c0, n, stride in k_layout]
  state = score_fn.prepare(query_refs, b, g)  # loop-invariant operands

  def body(i, carry):
    m, l, accs = carry
    s0 = start + i * bs
    rows = pl.ds(s0, bs)
    hk = load_latent_pieces(k_refs, b, rows, g * spec.k_rank, spec.k_rank,
                            spec, k_width, bs, dtype)
    pos = s0 + jnp.arange(bs, dtype=jnp.int32)
    s = score_fn(state, query_refs, list(zip(hk, k_rows)), pos, g)  # [M, bs]
    s = jnp.where((pos < length)[None, :], s, _FLOOR)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)          # rescales what was accumulated so far
    prob = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(prob, axis=1)
    if spec.shared:
      hv = hk                          # one latent read serves both
    else:
      hv = load_latent_pieces(v_refs, b, rows, g * spec.v_rank, spec.v_rank,
                              spec, v_width, bs, dtype)
    hi, lo = split_hi_lo(prob, dtype)
    accs = tuple(corr[:, None] * a + dot(hi, h) +
                 (0.0 if lo is None else dot(lo, h))
                 for a, h in zip(accs, hv))
    return m_new, l, accs

  m0 = jnp.full((heads,), _FLOOR, jnp.float32)
  l0 = jnp.zeros((heads,), jnp.float32)
  acc0 = tuple(jnp.zeros((heads, n), jnp.float32) for _, n, _ in v_layout)
  m, l, accs = jax.lax.fori_loop(0, n_blocks, body, (m0, l0, acc0))
  for (c0, n, stride), a in zip(v_layout, accs):
    acc_ref[b, g, p, :, pl.ds(c0, n, stride)] = a
  m_ref[b, g, p, :] = m
  l_ref[b, g, p, :] = l


def flash_decode(score_fn, query_ops: tuple, hk, hv, lengths, *,
                 spec: LatentSpec, config: KernelConfig, heads: int, dtype,
                 interpret: bool = False):
  """Runs the kernel over the cache sides hk / hv (bf16 arrays or
  `QuantLatent`s; hv unused with a shared latent) and merges the split
  partials -> [B, N, R_v] f32. `heads`: query rows per group (padded)."""
  k_side, v_side = cache_sides(hk, hv, spec)
  batch = lengths.shape[0]
  bs = config.block_s
  blocks = k_side[0].shape[1] // bs
  per = -(-blocks // config.splits)
  splits = -(-blocks // per)
  span = per * bs
  widths = [spec.groups * spec.k_rank, spec.groups * spec.v_rank]
  kernel = functools.partial(
      _kernel, spec=spec, config=config, n_query=len(query_ops),
      n_k=len(k_side), n_v=len(v_side), span=span, heads=heads,
      k_width=widths[0], v_width=widths[1], score_fn=score_fn, dtype=dtype)
  shape = (batch, spec.groups, splits, heads)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(batch, spec.groups, splits),
      out_shape=[jax.ShapeDtypeStruct(shape + (spec.v_rank,), jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="latent_flash_decode",
  )(lengths.astype(jnp.int32), *query_ops, *k_side, *v_side)
  out = combine_splits(acc, m, l)[:, :, :spec.heads_per_group]
  return out.reshape(batch, spec.n_heads, spec.v_rank)
