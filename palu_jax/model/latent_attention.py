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

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from palu_jax.config import ModelConfig
from palu_jax.model.attention import causal_probs, rotated_queries
from palu_jax.model.cache import LayerLatent, LayerQuantLatent
from palu_jax.model.layers import (apply_rope, linear, project,
                                   rope_cos_sin, rope_inv_freq)
from palu_jax.typing import Array
from pallas_kernels.common import split_hi_lo

log = logging.getLogger(__name__)
PREFILL_IMPLEMENTATIONS = ("cudnn", "xla", "jnp", None)


def rank_slices(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """(start, stop) of each group's latents along R."""
  edges = [0]
  for r in ranks:
    edges.append(edges[-1] + r)
  return tuple(zip(edges[:-1], edges[1:]))


class LatentAttention(nnx.Module):
  """GQA attention over a Palu latent cache.

  Decoding one token per sequence goes through
  `pallas_kernels.latent_attention.api` (a Pallas kernel on a GPU: Mosaic
  GPU on Hopper, Triton elsewhere; the jnp reference on a CPU;
  `implementation` forces one). Attention of tokens over themselves alone
  (no cache, or a fresh one: prefill) goes through
  `jax.nn.dot_product_attention` with
  `prefill_implementation` "cudnn" or "xla", or the jnp path below ("jnp");
  None picks cuDNN on a GPU. Everything else (chunks continuing a cache) is
  the jnp path.
  """

  # "mosaic_gpu" | "triton" ("pallas") | "xla" | None (automatic)
  implementation: str | None = None
  prefill_implementation: str | None = None  # "cudnn"|"xla"|"jnp"|None

  def __init__(self, cfg: ModelConfig, *, group_size: int,
               k_ranks: Sequence[int], v_ranks: Sequence[int], dtype,
               rngs: nnx.Rngs, shared_kv: bool = False, kv_bits: int = 16,
               quant_group: int = 32, scale_dtype=jnp.bfloat16,
               k_up_bits: int = 16):
    self.cfg = cfg
    self.group_size = group_size
    self.shared_kv = shared_kv
    self.kv_bits = kv_bits
    self.quant_group = quant_group
    self.scale_dtype = jnp.dtype(scale_dtype)
    # 8: B_k holds e4m3 values (`--k-up-bits 8`), what the Mosaic GPU
    # kernel's fp8 key rebuild multiplies; the kernels are told (LatentSpec)
    self.k_up_bits = k_up_bits
    self.k_slices = rank_slices(k_ranks)
    self.v_slices = rank_slices(v_ranks)
    d, h = cfg.dim, cfg.head_dim
    rk, rv = sum(k_ranks), sum(v_ranks)
    width = group_size * h                  # key columns of one group
    heads = group_size * cfg.q_per_kv       # query heads of one group
    normal = nnx.initializers.normal
    self.q_proj = linear(d, cfg.n_heads * h, bias=cfg.qkv_bias, dtype=dtype,
                         rngs=rngs, axes=("embed", "heads"))
    # logical axes (palu_jax.sharding): a latent group's latents, B_k rows
    # and W_o slice move together along "kv_groups"
    self.k_down = nnx.Param(normal(d ** -0.5)(rngs.params(), (d, rk), dtype),
                            logical_axes=("embed", "kv_groups"))
    self.k_up = nnx.Param(normal(rk ** -0.5)(rngs.params(), (rk, width), dtype),
                          logical_axes=("kv_groups", None))
    self.v_down = (None if shared_kv else
                   nnx.Param(normal(d ** -0.5)(rngs.params(), (d, rv), dtype),
                             logical_axes=("embed", "kv_groups")))
    self.o_latent = nnx.Param(normal((rv * cfg.q_per_kv) ** -0.5)(
        rngs.params(), (rv, heads, d), dtype),
        logical_axes=("kv_groups", None, "embed"))
    if cfg.qkv_bias:
      self.k_bias = nnx.Param(jnp.zeros((cfg.n_kv_heads * h,), dtype),
                              logical_axes=("kv_heads",))
      self.o_bias = nnx.Param(jnp.zeros((d,), dtype), logical_axes=("embed",))
    else:
      self.k_bias = self.o_bias = None

  def _query_projection(self, x: Array) -> Array:
    """x [B, T, D] -> q_proj(x) [B, T, N·H]. With one row (batch-1 decode)
    through `project` like the latents: the three projections then read one
    zero-padded copy of x, which XLA:GPU writes in the norm's kernel (the
    unpadded x of nn.Linear took one more kernel per layer; Llama-2-7B B1
    64K: 4 kernels fewer per layer with the unrolled split combine). With
    more rows nn.Linear: there XLA merged the query and latent GEMMs into
    one that ran slower (SmolLM2 B16 8K: 2.31 vs 2.17 ms per step)."""
    if x.shape[0] * x.shape[1] != 1:
      return self.q_proj(x)
    q = project(x, self.q_proj.kernel[...])
    if self.q_proj.bias is not None:
      q = q + self.q_proj.bias[...]
    return q

  def latents(self, x: Array) -> tuple[Array, Array]:
    """x [B, T, D] -> (h_k [B, T, Rk], h_v [B, T, Rv]); h_v is empty [B, T, 0]
    with a shared latent (h_k serves both)."""
    hk = project(x, self.k_down[...])
    if self.shared_kv:
      return hk, hk[..., :0]
    return hk, project(x, self.v_down[...])

  def _fake_quant(self, h: Array) -> Array:
    """The values a write to and read from the packed cache give back."""
    from palu_jax.quantize import latent_codes
    if h.shape[-1] == 0:
      return h
    return latent_codes.fake_quantize(h, bits=self.kv_bits,
                                      group=self.quant_group,
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
                      bits=self.kv_bits, quant_group=self.quant_group,
                      k_up_bits=self.k_up_bits)

  def uses_kernel(self) -> bool:
    """Whether one-token decode goes through the latent kernels' api."""
    import jax
    impl = self.implementation
    if impl is None:
      impl = "kernel" if jax.default_backend() == "gpu" else "xla"
    return impl != "xla" and self.kernel_spec() is not None

  def _decode_kernel(self, q: Array, cache, start: Array, dtype) -> Array:
    """One new token per sequence: q [B, 1, N, H] rotated -> [B, 1, D]."""
    from pallas_kernels.latent_attention.api import latent_decode_attention
    from pallas_kernels.common import QuantLatent
    spec = self.kernel_spec()
    if isinstance(cache, LayerQuantLatent):
      hk = QuantLatent(cache.k_codes, cache.k_scale, cache.k_offset)
      hv = None if self.shared_kv else QuantLatent(
          cache.v_codes, cache.v_scale, cache.v_offset)
    else:
      hk, hv = cache.hk, (None if self.shared_kv else cache.hv)
    b = q.shape[0]
    mixed = _per_device(
        functools.partial(latent_decode_attention,
                          inv_freq=jnp.asarray(rope_inv_freq(self.cfg)),
                          implementation=self.implementation),
        q[:, 0], hk, hv, self.k_up[...], start + 1,
        None if self.k_bias is None else self.k_bias[...], spec=spec)
    # mixed: [B, N, R_v] f32
    # o_latent [G·R_v, N_g, D] flattens to [(G, R_v, N_g), D]: order the
    # mixed latents the same way and project in one matrix product
    mixed = mixed.reshape(b, spec.groups, spec.heads_per_group, spec.v_rank)
    mixed = jnp.swapaxes(mixed, 2, 3).reshape(b, -1).astype(dtype)
    o = self.o_latent[...].reshape(-1, self.cfg.dim)
    out = project(mixed, o, out_dtype=jnp.float32)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(jnp.float32)
    return out[:, None].astype(dtype)

  def __call__(self, x: Array, cos: Array, sin: Array, q_pos: Array,
               cache: LayerLatent | None, start: Array, *, fresh: bool = False
               ) -> tuple[Array, LayerLatent | None]:
    """x [B, T, D]; cos/sin [B, T, H]; q_pos [B, T]; start [B] cache offset.

    fresh: the cache is empty (start is 0), so the T tokens attend only to
    themselves (prefill) and the rest of the cache is not read.
    """
    b, t, _ = x.shape
    c = self.cfg
    q = rotated_queries(self._query_projection, x, c, cos, sin)
    hk, hv = self.latents(x)
    if cache is not None:
      cache = cache.write(hk, hv, start)
      if t == 1 and self.uses_kernel():  # the kernel reads the cache itself
        return self._decode_kernel(q, cache, start, x.dtype), cache
    if cache is not None and not fresh:
      hk, hv = (cache.read(x.dtype) if isinstance(cache, LayerQuantLatent)
                else (cache.hk, cache.hv))
    elif self.kv_bits < 16:  # the same values a packed cache holds
      hk, hv = self._fake_quant(hk), self._fake_quant(hv)
    if self.shared_kv:
      hv = hk
    impl = self._prefill_implementation(x.dtype)
    self_only = cache is None or fresh   # keys are the T tokens, from 0
    heads = self.group_size * c.q_per_kv
    s = hk.shape[1]
    key_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    key_cos, key_sin = rope_cos_sin(key_pos, rope_inv_freq(c))  # once per call
    out = jnp.zeros((b, t, c.dim), jnp.float32)
    for g, (lo, hi) in enumerate(self.v_slices):
      qg = q[:, :, g * heads:(g + 1) * heads]
      keys = self.keys(hk, g, key_cos, key_sin)
      mixed = None
      if self_only and impl != "jnp":
        mixed = _dense_causal_attention(qg, keys, hv[..., lo:hi], impl)
      if mixed is None:
        probs = causal_probs(qg, keys, q_pos)                # [B,K,G,T,S]
        values = hv[..., lo:hi]
        if jax.default_backend() == "cpu":
          # XLA:CPU runs no batched 16-bit x 16-bit -> f32 dot outside a
          # fusion ("Unsupported element type for DotThunk"): mix in f32
          values = values.astype(jnp.float32)
        p_hi, p_lo = split_hi_lo(probs, values.dtype)
        mix = functools.partial(jnp.einsum, "BKGTS,BSR->BTKGR",
                                preferred_element_type=jnp.float32)
        mixed = mix(p_hi, values)
        if p_lo is not None:
          mixed = mixed + mix(p_lo, values)
        mixed = mixed.reshape(b, t, heads, hi - lo).astype(x.dtype)
      out = out + jnp.einsum("BTNR,RND->BTD", mixed, self.o_latent[lo:hi],
                             preferred_element_type=jnp.float32)
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(jnp.float32)
    return out.astype(x.dtype), cache

  def _prefill_implementation(self, dtype) -> str:
    impl = self.prefill_implementation
    if impl not in PREFILL_IMPLEMENTATIONS:
      raise ValueError(f"prefill_implementation must be one of "
                       f"{PREFILL_IMPLEMENTATIONS}, got {impl!r}")
    if impl is None:
      gpu = jax.default_backend() == "gpu"
      impl = "cudnn" if gpu and dtype in (jnp.bfloat16, jnp.float16) else "jnp"
    return impl


def _dense_causal_attention(q: Array, keys: Array, values: Array,
                            implementation: str) -> Array | None:
  """Causal attention of T tokens over themselves through
  `jax.nn.dot_product_attention`, with latent values of any width.

  q [B, T, J·Q, H] rotated queries of one group, keys [B, T, J, H] rotated,
  values [B, T, R] (the group's shared value latents) -> [B, T, J·Q, R] in
  q's dtype, or None when the implementation rejects the shape (logged).

  The API wants value heads as wide as the keys, so the R latents are cut
  into C = ⌈R/H⌉ chunks of H (zero-padded) and each (KV head, chunk) pair
  becomes one KV head, each query head reading its KV head's C of them.
  """
  b, t, n, h = q.shape
  j, r = keys.shape[2], values.shape[-1]
  qk = n // j
  chunks = -(-r // h)
  v = jnp.pad(values, [(0, 0), (0, 0), (0, chunks * h - r)])
  v = jnp.broadcast_to(v.reshape(b, t, 1, chunks, h), (b, t, j, chunks, h))
  k = jnp.broadcast_to(keys[:, :, :, None], (b, t, j, chunks, h))
  qr = jnp.broadcast_to(q.reshape(b, t, j, 1, qk, h), (b, t, j, chunks, qk, h))
  try:
    o = jax.nn.dot_product_attention(
        qr.reshape(b, t, n * chunks, h), k.reshape(b, t, j * chunks, h),
        v.reshape(b, t, j * chunks, h).astype(keys.dtype), is_causal=True,
        implementation=implementation)
  except (NotImplementedError, ValueError, RuntimeError) as err:
    _log_fallback(f"{implementation}: {err}")
    return None
  o = o.reshape(b, t, j, chunks, qk, h).transpose(0, 1, 2, 4, 3, 5)
  return o.reshape(b, t, n, chunks * h)[..., :r]


def _groups_split_whole(spec) -> bool:
  """Whether cutting a layer's stored latents (codes, scales, offsets)
  into equal slices of the last axis gives each slice whole groups: each
  group's codes fill whole bytes and its quant groups stay inside it."""
  if spec.bits == 16:
    return True
  if spec.bits == 3:                    # two bit planes across all groups
    return False
  ranks = (spec.k_rank,) + (() if spec.shared else (spec.v_rank,))
  return spec.quant_group > 0 and all(
      r * spec.bits % 8 == 0 and r % spec.quant_group == 0 for r in ranks)


def _per_device(attend, q, hk, hv, k_up, lengths, k_bias, *, spec):
  """attend(q [B, N, H], hk, hv, k_up, lengths, spec=, k_bias=) on every
  device over its own batch rows and latent groups when a mesh is set
  (`jax.set_mesh`, as `Generator(mesh=)` does): the Pallas kernels are
  custom calls XLA cannot partition, so without this it would gather the
  whole cache to every device. Groups go over "model" when they divide it
  and each group's codes are whole bytes of their own (16-bit, float8,
  4- and 2-bit latents; not 3-bit bit planes); batch rows over "data" when
  they divide it; whatever does not divide is replicated."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return attend(q, hk, hv, k_up, lengths, spec=spec, k_bias=k_bias)
  sizes = dict(mesh.shape)
  d, m = sizes.get("data", 1), sizes.get("model", 1)
  b_ax = "data" if d > 1 and q.shape[0] % d == 0 else None
  g_ax = ("model" if m > 1 and spec.groups % m == 0
          and _groups_split_whole(spec) else None)
  local = dataclasses.replace(spec, groups=spec.groups // (m if g_ax else 1))
  latent = P(b_ax, None, g_ax)
  # Width-0 arrays (float8's offsets, a shared latent's values) stay out
  # of shard_map and are made again inside: XLA's CPU SPMD partitioner
  # crashed (SIGSEGV) on them as manual-sharded operands.
  leaves, tree = jax.tree.flatten((hk, hv))
  full = [x for x in leaves if x.size]

  def body(q, full, k_up, lengths, k_bias):
    it = iter(full)
    hk, hv = jax.tree.unflatten(tree, [
        next(it) if x.size else jnp.zeros((q.shape[0],) + x.shape[1:],
                                          x.dtype) for x in leaves])
    return attend(q, hk, hv, k_up, lengths, spec=local, k_bias=k_bias)
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(b_ax, g_ax, None), [latent] * len(full), P(g_ax, None),
                P(b_ax), None if k_bias is None else P(g_ax)),
      out_specs=P(b_ax, g_ax, None), check_vma=False,
  )(q, full, k_up, lengths, k_bias)


@functools.cache
def _log_fallback(reason: str) -> None:
  log.warning("latent prefill attention: using the jnp path: %s", reason)
