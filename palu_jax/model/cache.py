"""KV caches: pytrees preallocated to a maximum length.

A cache holds one state per layer plus per-sequence lengths. The generation
loop only calls `init_cache`, passes the cache through the model and reads
`lengths`, so a compressed cache (per-layer latents instead of K/V) replaces
this one by giving each layer another state type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from palu_jax.typing import Array


def write_rows(buf: Array, new: Array, start: Array) -> Array:
  """Writes new [B, T, ...] into buf [B, S, ...] at per-sequence offsets [B]."""
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(
      b, n.astype(b.dtype), s, axis=0))(buf, new, start)


@struct.dataclass
class LayerKV:
  """One layer's full-precision keys and values (post-RoPE keys)."""
  k: Array  # [B, S, K, H]
  v: Array  # [B, S, K, H]

  def write(self, k_new: Array, v_new: Array, start: Array) -> "LayerKV":
    """k_new/v_new [B, T, K, H] written at rows start[b] .. start[b]+T-1."""
    return LayerKV(k=write_rows(self.k, k_new, start),
                   v=write_rows(self.v, v_new, start))


@struct.dataclass
class LayerLatent:
  """One layer's Palu latents: h_k = x·A_k (pre-RoPE) and h_v = x·A_v, with
  every head group's latents side by side along R."""
  hk: Array  # [B, S, Rk]
  hv: Array  # [B, S, Rv]

  def write(self, hk_new: Array, hv_new: Array, start: Array) -> "LayerLatent":
    """hk_new [B, T, Rk] / hv_new [B, T, Rv] written at rows start[b]..."""
    return LayerLatent(hk=write_rows(self.hk, hk_new, start),
                       hv=write_rows(self.hv, hv_new, start))


@struct.dataclass
class LayerQuantLatent:
  """One layer's Palu latents as per-token codes (`quantize.latent_codes`).

  4/3/2 bits: integer codes packed along R with a 16-bit scale and offset
  per group of `group` latents; 8 bits: float8 e4m3 codes with a scale per
  group and no offset (offset arrays of width 0). Values are quantized when
  written and dequantized when read, so attention sees exactly the values a
  fake-quant forward sees.
  """
  k_codes: Array    # [B, S, stored(Rk)] uint8 (packed ints) or float8_e4m3fn
  k_scale: Array    # [B, S, Rk / group]
  k_offset: Array   # [B, S, Rk / group] ([B, S, 0] at 8 bits)
  v_codes: Array    # [B, S, stored(Rv)] (width 0 with a shared latent)
  v_scale: Array
  v_offset: Array
  bits: int = struct.field(pytree_node=False, default=4)
  group: int = struct.field(pytree_node=False, default=32)
  k_width: int = struct.field(pytree_node=False, default=0)
  v_width: int = struct.field(pytree_node=False, default=0)

  def write(self, hk_new: Array, hv_new: Array, start: Array
            ) -> "LayerQuantLatent":
    """Quantizes and writes hk_new [B, T, Rk], hv_new [B, T, Rv]."""
    from palu_jax.quantize import latent_codes
    out = {}
    for side, h in (("k", hk_new), ("v", hv_new)):
      names = [f"{side}_codes", f"{side}_scale", f"{side}_offset"]
      if h.shape[-1] == 0:
        out.update({n: getattr(self, n) for n in names})
        continue
      stored = latent_codes.quantize(
          h, bits=self.bits, group=self.group,
          scale_dtype=getattr(self, f"{side}_scale").dtype)
      out.update({n: write_rows(getattr(self, n), new, start)
                  for n, new in zip(names, stored)})
    return self.replace(**out)

  def read(self, dtype) -> tuple[Array, Array]:
    """Dequantized (h_k [B, S, Rk], h_v [B, S, Rv]) in `dtype`."""
    from palu_jax.quantize import latent_codes
    out = []
    for side, width in (("k", self.k_width), ("v", self.v_width)):
      codes = getattr(self, f"{side}_codes")
      if width == 0:
        out.append(jnp.zeros(codes.shape[:2] + (0,), dtype))
        continue
      out.append(latent_codes.dequantize(
          codes, getattr(self, f"{side}_scale"),
          getattr(self, f"{side}_offset"), bits=self.bits, group=self.group,
          width=width, dtype=dtype))
    return out[0], out[1]


@struct.dataclass
class Cache:
  """Per-layer states and the number of valid tokens of each sequence."""
  layers: tuple  # one state per layer (LayerKV, or a compressed variant)
  lengths: Array  # [B] int32

  @property
  def max_len(self) -> int:
    return jax.tree_util.tree_leaves(self.layers[0])[0].shape[1]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.layers))


def init_kv_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int,
                  head_dim: int, dtype) -> Cache:
  shape = (batch, max_len, n_kv_heads, head_dim)
  layers = tuple(LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                 for _ in range(n_layers))
  return Cache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def init_latent_cache(k_widths, v_widths, batch: int, max_len: int, dtype
                      ) -> Cache:
  """An empty Palu cache; k_widths/v_widths [L] are Σ ranks per layer."""
  layers = tuple(LayerLatent(hk=jnp.zeros((batch, max_len, rk), dtype),
                             hv=jnp.zeros((batch, max_len, rv), dtype))
                 for rk, rv in zip(k_widths, v_widths))
  return Cache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def init_quant_latent_cache(k_widths, v_widths, batch: int, max_len: int, *,
                            bits: int, group, scale_dtype) -> Cache:
  """An empty quantized Palu cache; widths [L] are Σ ranks per layer, group
  the latents per scale (one int, or one per layer)."""
  from palu_jax.quantize import latent_codes
  groups = ([group] * len(k_widths) if isinstance(group, int)
            else list(group))
  def side(width, group):
    (cols, code_dtype), n_scale, n_offset = latent_codes.stored_shape(
        width, bits, group)
    return (jnp.zeros((batch, max_len, cols), code_dtype),
            jnp.zeros((batch, max_len, n_scale), scale_dtype),
            jnp.zeros((batch, max_len, n_offset), scale_dtype))
  layers = []
  for rk, rv, group in zip(k_widths, v_widths, groups, strict=True):
    (kc, ks, ko), (vc, vs, vo) = side(rk, group), side(rv, group)
    layers.append(LayerQuantLatent(kc, ks, ko, vc, vs, vo, bits=bits,
                                   group=group, k_width=rk, v_width=rv))
  return Cache(layers=tuple(layers), lengths=jnp.zeros((batch,), jnp.int32))
