"""Palu attention: the cache holds low-rank latents instead of keys/values.

Per group g of KV heads (see `PaluConfig`), with A the down-projections and
B the up-projections found by decomposition:

  h_k = x·A_k[g]   [B, S, r_g]   cached, pre-RoPE
  h_v = x·A_v[g]   [B, S, r'_g]  cached
  K   = RoPE(h_k·B_k[g] (+ b_k))  rebuilt from the cache at every call
  out = Σ_heads (softmax(q·Kᵀ)·h_v)·(B_v[g]·W_o[head])

The value up-projection is folded into W_o offline (`o_latent`, one
[r'_g, D] map per query head), so the attention weights latents directly and
values are never rebuilt. With q/k/v biases (Qwen2), b_k is added after the
key up-projection and b_v, which survives the softmax average unchanged,
becomes a constant output bias `o_bias`.

With `shared_kv`, one latent h = x·A per group feeds both (K = h·B_k, and
B_v folded as above): the cache stores it once, and the pair (A, [B_k B_v])
is the best rank-r factorization of the joint map [W_k W_v] (a block
split into separate key and value latents is one of its candidates).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from palu_jax.config import ModelConfig
from palu_jax.model.attention import causal_probs, rotated_queries
from palu_jax.model.cache import LayerLatent, LayerQuantLatent
from palu_jax.model.layers import (apply_rope, linear, rope_cos_sin,
                                   rope_inv_freq)
from palu_jax.typing import Array


def rank_slices(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """(start, stop) of each group's latents along R."""
  edges = [0]
  for r in ranks:
    edges.append(edges[-1] + r)
  return tuple(zip(edges[:-1], edges[1:]))


class LatentAttention(nnx.Module):
  """GQA attention over a Palu latent cache.

  Decoding one token per sequence goes through `pallas_kernels.api` (the
  Pallas kernel on a GPU, its jnp reference elsewhere; `implementation`
  forces one); everything else (prefill, chunks) is the jnp path below.
  """

  implementation: str | None = None  # "pallas" | "xla" | None (automatic)

  def __init__(self, cfg: ModelConfig, *, group_size: int,
               k_ranks: Sequence[int], v_ranks: Sequence[int], dtype,
               rngs: nnx.Rngs, shared_kv: bool = False, kv_bits: int = 16,
               quant_group: int = 32, scale_dtype=jnp.bfloat16):
    self.cfg = cfg
    self.group_size = group_size
    self.shared_kv = shared_kv
    self.kv_bits = kv_bits
    self.quant_group = quant_group
    self.scale_dtype = jnp.dtype(scale_dtype)
    self.k_slices = rank_slices(k_ranks)
    self.v_slices = rank_slices(v_ranks)
    d, h = cfg.dim, cfg.head_dim
    rk, rv = sum(k_ranks), sum(v_ranks)
    width = group_size * h                  # key columns of one group
    heads = group_size * cfg.q_per_kv       # query heads of one group
    normal = nnx.initializers.normal
    self.q_proj = linear(d, cfg.n_heads * h, bias=cfg.qkv_bias, dtype=dtype,
                         rngs=rngs)
    self.k_down = nnx.Param(normal(d ** -0.5)(rngs.params(), (d, rk), dtype))
    self.k_up = nnx.Param(normal(rk ** -0.5)(rngs.params(), (rk, width), dtype))
    self.v_down = (None if shared_kv else
                   nnx.Param(normal(d ** -0.5)(rngs.params(), (d, rv), dtype)))
    self.o_latent = nnx.Param(normal((rv * cfg.q_per_kv) ** -0.5)(
        rngs.params(), (rv, heads, d), dtype))
    if cfg.qkv_bias:
      self.k_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads * h,), dtype))
      self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
    else:
      self.k_bias = self.o_bias = None

  def latents(self, x: Array) -> tuple[Array, Array]:
    """x [B, T, D] -> (h_k [B, T, Rk], h_v [B, T, Rv]); h_v is empty [B, T, 0]
    with a shared latent (h_k serves both)."""
    hk = jnp.einsum("BTD,DR->BTR", x, self.k_down[...])
    if self.shared_kv:
      return hk, hk[..., :0]
    return hk, jnp.einsum("BTD,DR->BTR", x, self.v_down[...])

  def _fake_quant(self, h: Array) -> Array:
    """The values a write to and read from the packed cache give back."""
    from palu_jax.quantize import int_quant
    if h.shape[-1] == 0:
      return h
    return int_quant.fake_quantize(h, bits=self.kv_bits, group=self.quant_group,
                                   scale_dtype=self.scale_dtype)

  def keys(self, hk: Array, group: int, cos: Array, sin: Array) -> Array:
    """Rebuilds group `group`'s rotated keys [B, S, group_size, H] from its
    latents; cos/sin [B, S, H] are the tables of positions 0..S-1."""
    c = self.cfg
    lo, hi = self.k_slices[group]
    k = jnp.einsum("BSR,RC->BSC", hk[..., lo:hi], self.k_up[lo:hi])
    if self.k_bias is not None:
      width = self.group_size * c.head_dim
      k = k + self.k_bias[group * width:(group + 1) * width]
    b, s, _ = hk.shape
    return apply_rope(k.reshape(b, s, self.group_size, c.head_dim), cos, sin)

  def kernel_spec(self):
    """The layer as a `pallas_kernels.common.LatentSpec`, or None when its
    groups have unequal ranks (the kernel takes one rank per side)."""
    from pallas_kernels.common import LatentSpec
    ks = {hi - lo for lo, hi in self.k_slices}
    vs = {hi - lo for lo, hi in self.v_slices}
    if len(ks) != 1 or len(vs) != 1:
      return None
    c = self.cfg
    return LatentSpec(groups=len(self.k_slices), kv_per_group=self.group_size,
                      q_per_kv=c.q_per_kv, head_dim=c.head_dim,
                      k_rank=ks.pop(), v_rank=vs.pop(), shared=self.shared_kv,
                      bits=self.kv_bits, quant_group=self.quant_group)

  def uses_kernel(self) -> bool:
    """Whether one-token decode goes through `pallas_kernels.api`."""
    import jax
    impl = self.implementation
    if impl is None:
      impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl == "pallas" and self.kernel_spec() is not None

  def _decode_kernel(self, q: Array, cache, start: Array, dtype) -> Array:
    """One new token per sequence: q [B, 1, N, H] rotated -> [B, 1, D]."""
    from pallas_kernels.api import latent_decode_attention
    from pallas_kernels.common import QuantLatent
    spec = self.kernel_spec()
    if isinstance(cache, LayerQuantLatent):
      hk = QuantLatent(cache.k_codes, cache.k_scale, cache.k_offset)
      hv = None if self.shared_kv else QuantLatent(
          cache.v_codes, cache.v_scale, cache.v_offset)
    else:
      hk, hv = cache.hk, (None if self.shared_kv else cache.hv)
    b = q.shape[0]
    mixed = latent_decode_attention(
        q[:, 0], hk, hv, self.k_up[...], start + 1, spec=spec,
        inv_freq=jnp.asarray(rope_inv_freq(self.cfg)),
        k_bias=None if self.k_bias is None else self.k_bias[...],
        implementation=self.implementation)           # [B, N, R_v] f32
    mixed = mixed.reshape(b, spec.groups, spec.heads_per_group, spec.v_rank)
    o = self.o_latent[...].reshape(spec.groups, spec.v_rank,
                                   spec.heads_per_group, self.cfg.dim)
    out = jnp.einsum("BGNR,GRND->BD", mixed.astype(dtype), o,
                     preferred_element_type=jnp.float32)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(jnp.float32)
    return out[:, None].astype(dtype)

  def __call__(self, x: Array, cos: Array, sin: Array, q_pos: Array,
               cache: LayerLatent | None, start: Array
               ) -> tuple[Array, LayerLatent | None]:
    """x [B, T, D]; cos/sin [B, T, H]; q_pos [B, T]; start [B] cache offset."""
    b, t, _ = x.shape
    c = self.cfg
    q = rotated_queries(self.q_proj, x, c, cos, sin)
    hk, hv = self.latents(x)
    if cache is not None:
      cache = cache.write(hk, hv, start)
      if t == 1 and self.uses_kernel():  # the kernel reads the cache itself
        return self._decode_kernel(q, cache, start, x.dtype), cache
      hk, hv = (cache.read(x.dtype) if isinstance(cache, LayerQuantLatent)
                else (cache.hk, cache.hv))
    elif self.kv_bits < 16:  # no cache: the same values a packed cache holds
      hk, hv = self._fake_quant(hk), self._fake_quant(hv)
    if self.shared_kv:
      hv = hk
    heads = self.group_size * c.q_per_kv
    s = hk.shape[1]
    key_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    key_cos, key_sin = rope_cos_sin(key_pos, rope_inv_freq(c))  # once per call
    out = jnp.zeros((b, t, c.dim), jnp.float32)
    for g, (lo, hi) in enumerate(self.v_slices):
      probs = causal_probs(q[:, :, g * heads:(g + 1) * heads],
                           self.keys(hk, g, key_cos, key_sin),
                           q_pos)                            # [B,K,G,T,S]
      mixed = jnp.einsum("BKGTS,BSR->BTKGR", probs.astype(hv.dtype),
                         hv[..., lo:hi], preferred_element_type=jnp.float32)
      mixed = mixed.reshape(b, t, heads, hi - lo).astype(x.dtype)
      out = out + jnp.einsum("BTNR,RND->BTD", mixed, self.o_latent[lo:hi],
                             preferred_element_type=jnp.float32)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(jnp.float32)
    return out.astype(x.dtype), cache
