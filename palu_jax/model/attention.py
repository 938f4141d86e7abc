"""Grouped-query attention with RoPE, reading and writing a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from palu_jax.config import ModelConfig
from palu_jax.errors import GenerationError
from palu_jax.model import dense_decode
from palu_jax.model.cache import LayerKV
from palu_jax.model.layers import apply_rope, linear
from palu_jax.typing import Array

_MASKED = -1e30  # finite, so fully masked (padding) rows stay NaN-free


def attend(q: Array, k: Array, v: Array, q_pos: Array) -> Array:
  """Causal GQA attention with float32 scores and softmax.

  Args:
    q: [B, T, N, H] queries (already rotated).
    k: [B, S, K, H] keys (already rotated); row s holds position s.
    v: [B, S, K, H] values.
    q_pos: [B, T] position of each query; key s is visible iff s <= q_pos.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  probs = causal_probs(q, k, q_pos)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def causal_probs(q: Array, k: Array, q_pos: Array) -> Array:
  """Causal softmax(q·kᵀ/√H) in float32.

  Args:
    q: [B, T, N, H] rotated queries; query head n reads KV head n // G.
    k: [B, S, K, H] rotated keys; row s holds position s.
    q_pos: [B, T]; key s is visible iff s <= q_pos.

  Returns:
    [B, K, G, T, S] float32 probabilities.
  """
  return _causal_softmax(_scores(q, k), q_pos, q.shape[-1])


def _scores(q: Array, k: Array) -> Array:
  """q [B, T, N, H], k [B, S, K, H] -> unscaled q·kᵀ [B, K, G, T, S] f32."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  return jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, t, kh, n // kh, h), k,
                    preferred_element_type=jnp.float32)


def _causal_softmax(scores: Array, q_pos: Array, head_dim: int) -> Array:
  """softmax(scores/√H) [B, K, G, T, S] with key s visible iff s <= q_pos."""
  visible = jnp.arange(scores.shape[-1])[None, None, :] <= q_pos[:, :, None]
  scores = jnp.where(visible[:, None, None], scores * (head_dim ** -0.5),
                     _MASKED)                                   # [B,T,S] mask
  return jax.nn.softmax(scores, axis=-1)


def rotated_queries(q_proj, x: Array, cfg: ModelConfig, cos: Array,
                    sin: Array) -> Array:
  """x [B, T, D] -> RoPE'd queries [B, T, N, H] (both attention kinds)."""
  b, t, _ = x.shape
  return apply_rope(q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim),
                    cos, sin)


def _attend_quantized(q, k, v, q_pos, method, bits, group, residual):
  """`attend` where keys/values older than `residual` positions behind the
  query are the baseline's dequantized ones."""
  from palu_jax.quantize.kv_baselines import quantized_kv
  kq, vq = quantized_kv(k, v, method=method, bits=bits, group=group)
  b, t, n, h = q.shape
  recent = (q_pos[:, :, None] - jnp.arange(k.shape[1])[None, None, :]
            < residual)                                    # [B, T, S]
  scores = jnp.where(recent[:, None, None], _scores(q, k), _scores(q, kq))
  probs = _causal_softmax(scores, q_pos, h)
  near = jnp.where(recent[:, None, None], probs, 0.0)
  out = (jnp.einsum("BKGTS,BSKH->BTKGH", near, v.astype(jnp.float32)) +
         jnp.einsum("BKGTS,BSKH->BTKGH", probs - near, vq.astype(jnp.float32)))
  return out.reshape(b, t, n, h).astype(q.dtype)


class Attention(nnx.Module):
  """Multi-head attention with `n_kv_heads` shared key/value heads."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    self.q_proj = linear(cfg.dim, qd, bias=cfg.qkv_bias, dtype=dtype,
                         rngs=rngs, axes=("embed", "heads"))
    self.k_proj = linear(cfg.dim, kd, bias=cfg.qkv_bias, dtype=dtype,
                         rngs=rngs, axes=("embed", "kv_heads"))
    self.v_proj = linear(cfg.dim, kd, bias=cfg.qkv_bias, dtype=dtype,
                         rngs=rngs, axes=("embed", "kv_heads"))
    self.o_proj = linear(qd, cfg.dim, bias=False, dtype=dtype, rngs=rngs,
                         axes=("heads", "embed"))
    # (method, bits, group, residual) of a simulated quantized-KV baseline
    # (palu_jax.quantize.kv_baselines), full forward only; None = exact.
    self.kv_quant = None
    # dense decode kernel: "cudnn", "xla" or None (cuDNN where it runs)
    self.decode_impl = None

  def __call__(self, x: Array, cos: Array, sin: Array, q_pos: Array,
               cache: LayerKV | None, start: Array, *, fresh: bool = False
               ) -> tuple[Array, LayerKV | None]:
    """x [B, T, D]; cos/sin [B, T, H]; q_pos [B, T]; start [B] cache offset;
    fresh: the cache is empty, so attend to the T new tokens only."""
    b, t, _ = x.shape
    c = self.cfg
    q = rotated_queries(self.q_proj, x, c, cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim),
                   cos, sin)
    v = self.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    if cache is not None:
      if self.kv_quant is not None:
        raise GenerationError("simulated KV-cache quantization (kv_quant) is "
                              "for full-forward evaluation, not decoding")
      cache = cache.write(k, v, start)
      if not fresh:
        k, v = cache.k, cache.v
    if self.kv_quant is not None:
      out = _attend_quantized(q, k, v, q_pos, *self.kv_quant)
    elif t == 1 and cache is not None and not fresh and \
        dense_decode.pick(q, self.decode_impl) == "cudnn":
      out = dense_decode.decode_attention(q, k, v, q_pos[:, 0] + 1)
    else:
      out = attend(q, k, v, q_pos)
    return self.o_proj(out.reshape(b, t, c.n_heads * c.head_dim)), cache
