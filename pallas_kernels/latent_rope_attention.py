"""Decode attention over a Palu latent cache with keys rebuilt under RoPE.

Per cache tile of group g: K_j = h_k·B_k[g, j] for each of the group's KV
heads j, rotated at the tile's positions, scored against the (already
rotated) queries, then softmax-weighted latents h_v are summed in the
latent space (the value up-projection lives in W_o). Keys never leave
registers.

RoPE is done on the two halves of each head (rotate-half layout): with
K¹, K² = h·B¹, h·B² the half-columns of B, the rotated halves are
K¹cos − K²sin and K²cos + K¹sin, so no concatenation is needed in the
kernel, and scores are q¹·K¹ᵣ + q²·K²ᵣ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _flash_decode
from pallas_kernels.common import (Array, KernelConfig, LatentSpec,
                                   attend_latents, dequantize_side, dot,
                                   next_pow2, piece_layout, rebuilt_keys,
                                   rounded)

_STATIC = ("spec", "config", "interpret")


# B_k tiles of a group up to this many bytes are loaded once per program and
# held on chip across the loop; larger ones are re-read (from L2) per tile.
RESIDENT_B_BYTES = 64 * 1024


class _RopeScores:
  """score_fn of the RoPE path (see `_flash_decode`).

  query_ops: q1, q2 [B, G, J, M, Hh] (block-diagonal: row n is zero outside
  its KV head j), b1, b2 [G, J, R, Hh], bias1, bias2 [G, J, Hh], inv_freq [Hh].
  """

  def __init__(self, spec: LatentSpec, dtype, hh: int,
               resident: bool | None):
    self.spec, self.dtype = spec, dtype
    b_bytes = 2 * spec.kv_per_group * spec.k_rank * hh * jnp.dtype(
        dtype).itemsize
    self.resident = (b_bytes <= RESIDENT_B_BYTES if resident is None
                     else resident)

  def prepare(self, refs, b, g):
    """Loop invariants: the frequencies and, when small enough, every KV
    head's B_k pieces, biases and query rows (loaded once, kept on chip)."""
    q1, q2, b1, b2, bias1, bias2, inv = refs
    if not self.resident:
      return b, inv[...], None
    rows = [pl.ds(c0, n, stride)
            for c0, n, stride in piece_layout(self.spec, self.spec.k_rank)]
    heads = []
    for j in range(self.spec.kv_per_group):
      jj = g * 0 + j    # traced: strided ref indexing rejects a Python int
      heads.append(([b1[g, jj, r, :] for r in rows],
                    [b2[g, jj, r, :] for r in rows],
                    bias1[g, jj, :], bias2[g, jj, :],
                    q1[b, g, jj], q2[b, g, jj]))
    return b, inv[...], heads

  def __call__(self, state, refs, pieces, pos, g):
    b, inv_freq, resident = state
    q1, q2, b1, b2, bias1, bias2, _ = refs
    angle = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(angle), jnp.sin(angle)                # [bs, Hh]

    def score(h_pieces, bk1, bk2, kb1, kb2, qr1, qr2):
      k1 = k2 = None
      for h, w1, w2 in zip(h_pieces, bk1, bk2):
        p1, p2 = dot(h, w1), dot(h, w2)
        k1 = p1 if k1 is None else k1 + p1
        k2 = p2 if k2 is None else k2 + p2
      # K rounded to the cache dtype before and after the bias, then rotated
      # in f32: the rounding points of the model's jnp path (`keys`)
      dt = self.dtype
      k1 = rounded(rounded(k1, dt) + kb1[None, :], dt)
      k2 = rounded(rounded(k2, dt) + kb2[None, :], dt)
      r1 = (k1 * cos - k2 * sin).astype(self.dtype)
      r2 = (k2 * cos + k1 * sin).astype(self.dtype)
      return (dot(qr1, r1, trans_b=True) + dot(qr2, r2, trans_b=True))

    h_pieces = [h for h, _ in pieces]
    if resident is not None:
      scores = sum(score(h_pieces, *head) for head in resident)
    else:
      def head(j, scores):
        # one KV head at a time (a loop, not unrolled): only its slice of B
        # is live, which keeps the tiles within shared memory
        return scores + score(
            h_pieces, [b1[g, j, rows, :] for _, rows in pieces],
            [b2[g, j, rows, :] for _, rows in pieces], bias1[g, j, :],
            bias2[g, j, :], q1[b, g, j], q2[b, g, j])
      zero = jnp.zeros((q1.shape[3], pos.shape[0]), jnp.float32)
      scores = jax.lax.fori_loop(0, self.spec.kv_per_group, head, zero)
    return scores * (self.spec.head_dim ** -0.5)  # in f32, as the model


def rope_operands(q: Array, k_up: Array, k_bias: Array | None,
                  inv_freq: Array, spec: LatentSpec, heads: int, dtype):
  """Rearranges queries and B_k into the kernel's half-column tiles.

  q [B, N, H] (rotated) -> q1, q2 [B, G, J, M, Hh] (the scores are scaled
  by 1/√H in f32 in the kernel); k_up
  [G·R, J·H] -> b1, b2 [G, J, R, Hh]; biases [G, J, Hh]; inv_freq [Hh].
  Hh = H/2 padded to a power of two ≥ 16 with zero columns; M = query heads
  of a group padded to `heads` rows with zeros.
  """
  g, j, qk, h = spec.groups, spec.kv_per_group, spec.q_per_kv, spec.head_dim
  half = h // 2
  hh = max(16, next_pow2(half))
  batch = q.shape[0]
  pad_cols = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, hh - half)])
  qg = q.reshape(batch, g, j, qk, h).astype(jnp.float32)
  eye = jnp.eye(j, dtype=jnp.float32)
  # row (j', n) of KV head j's tile is q_n if j' == j else 0
  blockdiag = jnp.einsum("BGiqH,ij->BGjiqH", qg, eye,  # HIGHEST: no TF32
                         precision=jax.lax.Precision.HIGHEST).reshape(
      batch, g, j, j * qk, h)
  blockdiag = jnp.pad(blockdiag, [(0, 0)] * 3 + [(0, heads - j * qk), (0, 0)])
  q1 = pad_cols(blockdiag[..., :half]).astype(dtype)
  q2 = pad_cols(blockdiag[..., half:]).astype(dtype)
  b = k_up.reshape(g, spec.k_rank, j, h).transpose(0, 2, 1, 3)
  b1 = pad_cols(b[..., :half]).astype(dtype)
  b2 = pad_cols(b[..., half:]).astype(dtype)
  if k_bias is None:
    k_bias = jnp.zeros((g * j * h,), jnp.float32)
  kb = k_bias.reshape(g, j, h).astype(jnp.float32)
  inv = pad_cols(jnp.asarray(inv_freq, jnp.float32))
  bias = [pad_cols(kb[..., :half]).astype(dtype),
          pad_cols(kb[..., half:]).astype(dtype)]
  return (q1, q2, b1, b2, *bias, inv)


@functools.partial(jax.jit, static_argnames=_STATIC)
def latent_rope_attention(q: Array, hk, hv, k_up: Array, lengths: Array, *,
                          spec: LatentSpec, inv_freq: Array,
                          k_bias: Array | None = None,
                          config: KernelConfig = KernelConfig(),
                          interpret: bool = False) -> Array:
  """Decode attention of one new token over a latent cache, RoPE keys.

  Args:
    q: [B, N, H] rotated queries of the new token (bf16 or fp16).
    hk: key latents [B, S, G·R_k] or a `QuantLatent`.
    hv: value latents (same kinds, [.., G·R_v]); None with `spec.shared`.
    k_up: [G·R_k, J·H] key up-projection (rows of group g: g·R_k..).
    lengths: [B] valid cache rows per sequence (row s holds position s).
    spec: shapes, see `LatentSpec`; inv_freq [H/2] RoPE frequencies.
    k_bias: [G·J·H] key bias added after the up-projection, or None.

  Returns:
    [B, N, R_v] float32: per query head, softmax(q·Kᵀ/√H)·h_v.
  """
  dtype = q.dtype
  heads = max(16, next_pow2(spec.heads_per_group))
  ops = rope_operands(q, k_up, k_bias, inv_freq, spec, heads, dtype)
  return _flash_decode.flash_decode(
      _RopeScores(spec, dtype, ops[0].shape[-1], config.resident_b), ops, hk, hv, lengths, spec=spec,
      config=config, heads=heads, dtype=dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def latent_rope_attention_reference(q: Array, hk, hv, k_up: Array,
                                    lengths: Array, *, spec: LatentSpec,
                                    inv_freq: Array,
                                    k_bias: Array | None = None,
                                    config: KernelConfig = KernelConfig(),
                                    interpret: bool = False) -> Array:
  """`latent_rope_attention` in plain jnp: rebuild every key, rotate, attend
  (scores and softmax in f32)."""
  del config, interpret
  h = spec.head_dim
  hk_v = dequantize_side(hk, spec, spec.groups * spec.k_rank, q.dtype)
  keys = rebuilt_keys(hk_v, k_up, k_bias, spec, q.dtype)  # [B, S, G, J, H]
  angle = jnp.arange(keys.shape[1], dtype=jnp.float32)[:, None] * \
      jnp.asarray(inv_freq, jnp.float32)[None, :]
  cos = jnp.concatenate([jnp.cos(angle)] * 2, -1)[None, :, None, None, :]
  sin = jnp.concatenate([jnp.sin(angle)] * 2, -1)[None, :, None, None, :]
  rotated = jnp.concatenate([-keys[..., h // 2:], keys[..., :h // 2]], -1)
  keys = (keys * cos + rotated * sin).astype(q.dtype)
  return attend_latents(q, keys, hk_v, hv, lengths, spec)
