"""Grouped-query attention with RoPE, reading and writing a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from palu_jax.config import ModelConfig
from palu_jax.errors import GenerationError
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
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  visible = jnp.arange(k.shape[1])[None, None, :] <= q_pos[:, :, None]  # [B,T,S]
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  return jax.nn.softmax(scores, axis=-1)


def _attend_quantized(q, k, v, q_pos, method, bits, group, residual):
  """`attend` where keys/values older than `residual` positions behind the
  query are the baseline's dequantized ones."""
  from palu_jax.quantize.kv_baselines import quantized_kv
  kq, vq = quantized_kv(k, v, method=method, bits=bits, group=group)
  b, t, n, h = q.shape
  kh = k.shape[2]
  recent = (q_pos[:, :, None] - jnp.arange(k.shape[1])[None, None, :]
            < residual)                                    # [B, T, S]
  qg = q.reshape(b, t, kh, n // kh, h)
  exact = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k,
                     preferred_element_type=jnp.float32)
  approx = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kq,
                      preferred_element_type=jnp.float32)
  scores = jnp.where(recent[:, None, None], exact, approx) * (h ** -0.5)
  visible = jnp.arange(k.shape[1])[None, None, :] <= q_pos[:, :, None]
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  near = jnp.where(recent[:, None, None], probs, 0.0)
  out = (jnp.einsum("BKGTS,BSKH->BTKGH", near, v.astype(jnp.float32)) +
         jnp.einsum("BKGTS,BSKH->BTKGH", probs - near, vq.astype(jnp.float32)))
  return out.reshape(b, t, n, h).astype(q.dtype)


class Attention(nnx.Module):
  """Multi-head attention with `n_kv_heads` shared key/value heads."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    self.q_proj = linear(cfg.dim, qd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.k_proj = linear(cfg.dim, kd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = linear(cfg.dim, kd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.o_proj = linear(qd, cfg.dim, bias=False, dtype=dtype, rngs=rngs)
    # (method, bits, group, residual) of a simulated quantized-KV baseline
    # (palu_jax.quantize.kv_baselines), full forward only; None = exact.
    self.kv_quant = None

  def __call__(self, x: Array, cos: Array, sin: Array, q_pos: Array,
               cache: LayerKV | None, start: Array
               ) -> tuple[Array, LayerKV | None]:
    """x [B, T, D]; cos/sin [B, T, H]; q_pos [B, T]; start [B] cache offset."""
    b, t, _ = x.shape
    c = self.cfg
    q = apply_rope(self.q_proj(x).reshape(b, t, c.n_heads, c.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim),
                   cos, sin)
    v = self.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    if cache is not None:
      if self.kv_quant is not None:
        raise GenerationError("simulated KV-cache quantization (kv_quant) is "
                              "for full-forward evaluation, not decoding")
      cache = cache.write(k, v, start)
      k, v = cache.k, cache.v
    if self.kv_quant is not None:
      out = _attend_quantized(q, k, v, q_pos, *self.kv_quant)
    else:
      out = attend(q, k, v, q_pos)
    return self.o_proj(out.reshape(b, t, c.n_heads * c.head_dim)), cache
