"""Decode attention over a latent cache without RoPE: B_k folded into q.

Without a position-dependent rotation, q·(h·B_k)ᵀ = (q·B_kᵀ)·hᵀ, so each
query is projected once into the latent space (q' [R_k] per head) and the
kernel attends over latents directly, like multi-query attention with a
head dim of R_k and a value dim of R_v. A key bias adds q·b_k, the same for
every position, which the softmax cancels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _flash_decode
from pallas_kernels.common import (Array, KernelConfig, LatentSpec,
                                   attend_latents, dequantize_side, dot, f32,
                                   next_pow2, rebuilt_keys)

_STATIC = ("spec", "config", "interpret")


class _AbsorbedScores:
  """score_fn of the non-RoPE path: query_ops = (q' [B, G, M, R_k],)."""

  def prepare(self, refs, b, g):
    return b

  def __call__(self, b, refs, pieces, pos, g):
    (qf,) = refs
    scores = None
    for h, rows in pieces:
      s = dot(qf[b, g, :, rows], h, trans_b=True)                # [M, bs]
      scores = s if scores is None else scores + s
    return scores


def absorbed_queries(q: Array, k_up: Array, spec: LatentSpec, heads: int,
                     dtype) -> Array:
  """q [B, N, H] -> q' = q·B_kᵀ/√H [B, G, M, R_k] (M: heads padded).

  f32 products summed over H in f32, written as a multiply and a reduce:
  XLA:GPU runs that as one fusion, where the batched f32 dot (batch dims
  G, J not leading) took transposes and a HIGHEST-precision GEMM around
  it. Llama-3-8B B1, no RoPE, one call on the H200 (span): M-LRD 4K
  14.0 → 11.5 µs, 64K 46.5 → 42.8 µs; G-LRD-4 15.0 → 13.3 and 47.7 → 44.6
  µs (eval/results/bench_kernels_h200_absorbed_queries_*.md)."""
  g, j, qk, h = spec.groups, spec.kv_per_group, spec.q_per_kv, spec.head_dim
  batch = q.shape[0]
  qg = f32(q).reshape(batch, g, j, qk, 1, h)
  b = jnp.swapaxes(f32(k_up).reshape(g, spec.k_rank, j, h), 1, 2)
  qf = jnp.sum(qg * b[None, :, :, None], axis=-1) / math.sqrt(h)  # BGJQR
  qf = qf.reshape(batch, g, j * qk, spec.k_rank)
  return jnp.pad(qf, [(0, 0), (0, 0), (0, heads - j * qk), (0, 0)]
                 ).astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def absorb_attention(q: Array, hk, hv, k_up: Array, lengths: Array, *,
                     spec: LatentSpec, inv_freq: Array | None = None,
                     k_bias: Array | None = None,
                     config: KernelConfig = KernelConfig(),
                     interpret: bool = False) -> Array:
  """Decode attention of one token over a latent cache, keys without RoPE.

  Same arguments and result as `latent_rope_attention`; q is not rotated,
  inv_freq must be None.
  """
  del k_bias  # softmax-invariant, see the module docstring
  if inv_freq is not None:
    raise ValueError("absorb_attention has no RoPE; pass inv_freq=None")
  dtype = q.dtype
  heads = max(16, next_pow2(spec.heads_per_group))
  qf = absorbed_queries(q, k_up, spec, heads, dtype)
  return _flash_decode.flash_decode(
      _AbsorbedScores(), (qf,), hk, hv, lengths, spec=spec, config=config,
      heads=heads, dtype=dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def absorb_attention_reference(q: Array, hk, hv, k_up: Array,
                               lengths: Array, *, spec: LatentSpec,
                               inv_freq: Array | None = None,
                               k_bias: Array | None = None,
                               config: KernelConfig = KernelConfig(),
                               interpret: bool = False) -> Array:
  """`absorb_attention` in plain jnp: rebuild every key K = h·B_k (+ b_k)
  and attend with f32 scores, no rotation."""
  del config, interpret, inv_freq
  hk_v = dequantize_side(hk, spec, spec.groups * spec.k_rank, q.dtype)
  keys = rebuilt_keys(hk_v, k_up, k_bias, spec, q.dtype).astype(q.dtype)
  return attend_latents(q, keys, hk_v, hv, lengths, spec)
