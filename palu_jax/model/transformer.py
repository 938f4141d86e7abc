"""The Llama-family decoder as a Flax NNX module."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import keymap
from palu_jax.config import ModelConfig
from palu_jax.errors import CheckpointError
from palu_jax.model.attention import Attention
from palu_jax.model.cache import Cache, init_kv_cache
from palu_jax.model.layers import MLP, RMSNorm, linear, rope_cos_sin, rope_inv_freq
from palu_jax.typing import Array


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, q_pos, cache, start):
    h, cache = self.attn(self.attn_norm(x), cos, sin, q_pos, cache, start)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """Decoder-only transformer (Llama, Llama-3, Mistral, Qwen2 layouts).

  Weights and activations use `dtype` (bfloat16 by default); norms, RoPE,
  attention softmax and logits are computed in float32.
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=dtype,
                           param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    linear(cfg.dim, cfg.vocab_size, bias=False, dtype=dtype,
                           rngs=rngs))

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    c = self.cfg
    return init_kv_cache(c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim,
                         self.dtype)

  def logits(self, x: Array) -> Array:
    """Final norm + LM head: [B, T, D] -> [B, T, V] float32."""
    x = self.final_norm(x)
    if self.lm_head is None:
      return jnp.einsum("BTD,VD->BTV", x, self.embed.embedding[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x, self.lm_head.kernel[...],
                      preferred_element_type=jnp.float32)

  def prelude(self, tokens: Array, cache: Cache | None = None):
    """Embeddings and RoPE tables shared by every layer.

    Returns:
      x [B, T, D], cos/sin [B, T, H], q_pos [B, T], start [B] (cache offset).
    """
    b, t = tokens.shape
    start = (jnp.zeros((b,), jnp.int32) if cache is None
             else cache.lengths)
    q_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    cos, sin = rope_cos_sin(q_pos, rope_inv_freq(self.cfg))
    return self.embed(tokens), cos, sin, q_pos, start

  def __call__(self, tokens: Array, cache: Cache | None = None, *,
               num_valid: Array | None = None,
               logits_at: Array | None = None) -> tuple[Array, Cache | None]:
    """Runs T new tokens per sequence.

    Args:
      tokens: [B, T] int token ids. With a cache they continue each sequence
        at position `cache.lengths[b]`; without one they start at 0.
      cache: optional cache to read and append to.
      num_valid: [B] how many of the T tokens are real (right padding); the
        cache length advances by this much. Defaults to T.
      logits_at: [B] optional index into T; if given only those positions'
        logits are computed.

    Returns:
      logits [B, T, V] (or [B, 1, V] with `logits_at`) float32, new cache.
    """
    t = tokens.shape[1]
    x, cos, sin, q_pos, start = self.prelude(tokens, cache)
    states = []
    for i, layer in enumerate(self.layers):
      x, state = layer(x, cos, sin, q_pos,
                       None if cache is None else cache.layers[i], start)
      states.append(state)
    if cache is not None:
      advance = t if num_valid is None else num_valid.astype(jnp.int32)
      cache = Cache(layers=tuple(states), lengths=start + advance)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32),
                              axis=1)
    return self.logits(x), cache


def _nest(flat: Mapping[str, np.ndarray], dtype) -> dict:
  """{'layers.0.attn.q_proj.kernel': a} -> {'layers': {0: {...}}}."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(value, dtype=dtype)
  return out


def from_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], *,
                dtype=jnp.bfloat16) -> Transformer:
  """Builds a Transformer holding `params` (canonical flat keys) in `dtype`."""
  keymap.check_params(params, cfg.to_dict(), None)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  try:
    state.replace_by_pure_dict(_nest(params, dtype))
  except (KeyError, ValueError) as e:
    raise CheckpointError(None, f"parameters do not fit the model: {e}") from e
  return nnx.merge(graphdef, state)


def random_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0
                 ) -> Transformer:
  """A randomly initialised model (benchmarks, tests), built under jit."""
  @nnx.jit
  def make():
    return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  return make()
