"""The Llama-family decoder as a Flax NNX module."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import keymap
from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.errors import CheckpointError, ConfigError
from palu_jax.fields import require_positive_int
from palu_jax.model.attention import Attention
from palu_jax.model.cache import (Cache, init_kv_cache, init_latent_cache,
                                  init_quant_latent_cache)
from palu_jax.model.latent_attention import LatentAttention
from palu_jax.model.layers import MLP, RMSNorm, linear, rope_cos_sin, rope_inv_freq
from palu_jax.typing import Array


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP.

  `latent` = (group_size, k_ranks, v_ranks, shared_kv, (kv_bits,
  quant_group, scale_dtype, k_up_bits)) makes the attention a Palu
  `LatentAttention`; None keeps the dense one.
  """

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs,
               latent: tuple | None = None):
    self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    if latent is None:
      self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    else:
      group_size, k_ranks, v_ranks, shared_kv, quant = latent
      self.attn = LatentAttention(cfg, group_size=group_size, k_ranks=k_ranks,
                                  v_ranks=v_ranks, dtype=dtype, rngs=rngs,
                                  shared_kv=shared_kv, kv_bits=quant[0],
                                  quant_group=quant[1], scale_dtype=quant[2],
                                  k_up_bits=quant[3])
    self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, q_pos, cache, start, fresh=False):
    h, cache = self.attn(self.attn_norm(x), cos, sin, q_pos, cache, start,
                         fresh=fresh)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """Decoder-only transformer (Llama, Llama-3, Mistral, Qwen2 layouts).

  Weights and activations use `dtype` (bfloat16 by default); norms, RoPE,
  attention softmax and logits are computed in float32. With `palu`, every
  layer's attention reads a low-rank latent cache (Palu).
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16,
               rngs: nnx.Rngs, palu: PaluConfig | None = None):
    self.cfg = cfg
    self.palu = palu
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.dim, dtype=dtype, param_dtype=dtype, rngs=rngs,
        embedding_init=nnx.with_metadata(   # nnx.Embed's default init
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                              out_axis=0),
            logical_axes=("vocab", "embed")))
    if palu is not None:
      palu.validate(cfg)
    self.layers = nnx.List([
        Block(cfg, dtype=dtype, rngs=rngs,
              latent=None if palu is None else
              (palu.group_size, palu.k_ranks[i], palu.v_ranks[i],
               palu.shared_kv,
               (palu.kv_bits, palu.layer_quant_group(i), palu.scale_dtype,
                palu.k_up_bits)))
        for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    linear(cfg.dim, cfg.vocab_size, bias=False, dtype=dtype,
                           rngs=rngs, axes=("embed", "vocab")))

  def set_attention_implementation(self, implementation: str | None, *,
                                   prefill: str | None = None) -> None:
    """For every latent layer: decode attention `implementation`
    "mosaic_gpu", "triton" (alias "pallas"), "xla" or None (automatic; see
    `pallas_kernels.latent_attention.api`), and `prefill`
    attention "cudnn", "xla", "jnp" or None (automatic; see
    `LatentAttention`)."""
    for layer in self.layers:
      if isinstance(layer.attn, LatentAttention):
        layer.attn.implementation = implementation
        layer.attn.prefill_implementation = prefill

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens
    (a latent cache read by the kernels is rounded up to a multiple of 128
    rows: the Mosaic GPU kernel's largest tile, which it takes only when
    the cache length is a multiple of it)."""
    c, p = self.cfg, self.palu
    require_positive_int("batch", batch)
    require_positive_int("max_len", max_len)
    if p is not None and self.layers[0].attn.uses_kernel():
      max_len = -(-max_len // 128) * 128
    if p is not None and p.kv_bits < 16:
      return init_quant_latent_cache(
          [sum(r) for r in p.k_ranks],
          [0 if p.shared_kv else sum(r) for r in p.v_ranks], batch, max_len,
          bits=p.kv_bits,
          group=[p.layer_quant_group(i) for i in range(c.n_layers)],
          scale_dtype=jnp.dtype(p.scale_dtype))
    if p is not None:
      return init_latent_cache([sum(r) for r in p.k_ranks],
                               [0 if p.shared_kv else sum(r)
                                for r in p.v_ranks], batch, max_len,
                               self.dtype)
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
               logits_at: Array | None = None,
               fresh_cache: bool = False) -> tuple[Array, Cache | None]:
    """Runs T new tokens per sequence.

    Args:
      tokens: [B, T] int token ids. With a cache they continue each sequence
        at position `cache.lengths[b]`; without one they start at 0.
      cache: optional cache to read and append to.
      num_valid: [B] how many of the T tokens are real (right padding); the
        cache length advances by this much. Defaults to T.
      logits_at: [B] optional index into T; if given only those positions'
        logits are computed.
      fresh_cache: promise that `cache` is empty (prefill): the tokens
        attend to each other only, without reading the rest of the cache
        (and through cuDNN on a GPU for latent layers).

    Returns:
      logits [B, T, V] (or [B, 1, V] with `logits_at`) float32, new cache.
    """
    t = tokens.shape[1]
    if cache is None and t > self.cfg.max_seq_len:
      # positions past the context get RoPE angles the model never saw
      raise ConfigError("tokens", f"{t} tokens are past the model's context "
                        f"of {self.cfg.max_seq_len} (max_seq_len)")
    x, cos, sin, q_pos, start = self.prelude(tokens, cache)
    states = []
    for i, layer in enumerate(self.layers):
      x, state = layer(x, cos, sin, q_pos,
                       None if cache is None else cache.layers[i], start,
                       fresh=fresh_cache)
      states.append(state)
    if cache is not None:
      advance = t if num_valid is None else num_valid.astype(jnp.int32)
      cache = Cache(layers=tuple(states), lengths=start + advance)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32),
                              axis=1)
    return self.logits(x), cache


def _nest(flat: Mapping[str, np.ndarray], dtype, place=None) -> dict:
  """{'layers.0.attn.q_proj.kernel': a} -> {'layers': {0: {...}}};
  place(key, array) puts each on its devices (default: jnp.asarray)."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = (jnp.asarray(value, dtype=dtype) if place is None
                       else place(key, value))
  return out


def _check_shapes(params: Mapping[str, np.ndarray], state) -> None:
  """Names the first missing, unexpected or misshapen parameter."""
  want = {".".join(map(str, path)): v.shape
          for path, v in nnx.to_flat_state(state)}
  missing = sorted(set(want) - set(params))
  extra = sorted(set(params) - set(want))
  if missing or extra:
    raise CheckpointError(None, f"parameters do not fit the model: missing "
                          f"{missing[:3]}, unexpected {extra[:3]}")
  for k, shape in want.items():
    if tuple(np.shape(params[k])) != tuple(shape):
      raise CheckpointError(None, f"{k}: shape {np.shape(params[k])}, the "
                            f"model needs {tuple(shape)}", field=k)


def from_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], *,
                dtype=jnp.bfloat16, palu: PaluConfig | None = None,
                mesh=None) -> Transformer:
  """Builds a Transformer holding `params` (canonical flat keys) in `dtype`;
  `palu` for a compressed model's parameters. With `mesh`, each parameter
  goes from the host straight into its shards (its logical axes on the
  mesh), so no device holds a full copy of a sharded weight."""
  if palu is None:
    keymap.check_params(params, cfg.to_dict(), None)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype,
                                                rngs=nnx.Rngs(0), palu=palu))
  graphdef, state = nnx.split(abstract)
  if palu is not None:
    _check_shapes(params, state)
  place = None
  if mesh is not None:
    from palu_jax.sharding.shard import flat_shardings, put
    where = flat_shardings(state, mesh)

    def place(key, value):
      if key not in where:            # named by the fit check below
        return jnp.asarray(value, dtype=dtype)
      if isinstance(value, jax.Array):
        return put(value.astype(dtype), where[key])
      return put(np.asarray(value).astype(dtype), where[key])
  try:
    state.replace_by_pure_dict(_nest(params, dtype, place))
  except (KeyError, ValueError) as e:
    raise CheckpointError(None, f"parameters do not fit the model: {e}") from e
  return nnx.merge(graphdef, state)


def random_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0,
                 palu: PaluConfig | None = None) -> Transformer:
  """A randomly initialised model (benchmarks, tests), built under jit."""
  @nnx.jit
  def make():
    return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed), palu=palu)
  return make()
