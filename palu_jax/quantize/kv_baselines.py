"""Quantized full-KV-cache baselines, simulated for perplexity.

- per-token RTN: keys (post-RoPE) and values quantized per token and head
  in groups of `group` along the head dim;
- KIVI (Liu et al. 2024): keys per channel in groups of `group` tokens,
  values per token, and the most recent `residual` tokens kept in full
  precision. The residual is simulated as a sliding window: key s is exact
  for query t iff t − s < residual, which is the most KIVI's streaming
  residual (between 0 and `residual` tokens) ever keeps.

These run in a full forward (values are quantized, then dequantized); a
packed KIVI cache for decoding is not implemented.
"""

from __future__ import annotations

import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.quantize import int_quant
from palu_jax.typing import Array


def _per_token(x: Array, bits: int, group: int) -> Array:
  """x [B, S, K, H]: fake quantization along H per (token, head), in groups
  of min(group, H)."""
  return int_quant.fake_quantize(x, bits=bits, group=min(group, x.shape[-1]))


def _per_channel(x: Array, bits: int, group: int) -> Array:
  """x [B, S, K, H]: fake quantization along S per channel, `group` tokens."""
  if x.shape[1] % group:
    raise ConfigError("quant_group", f"KIVI key groups of {group} tokens "
                      f"need a length divisible by it, got {x.shape[1]}")
  t = jnp.moveaxis(x, 1, -1)                                 # [B, K, H, S]
  return jnp.moveaxis(_per_token(t, bits, group), -1, 1)


def quantized_kv(k: Array, v: Array, *, method: str, bits: int, group: int
                 ) -> tuple[Array, Array]:
  """Dequantized (k, v) [B, S, K, H] of a baseline ('rtn' or 'kivi')."""
  if method == "rtn":
    return _per_token(k, bits, group), _per_token(v, bits, group)
  if method == "kivi":
    return _per_channel(k, bits, group), _per_token(v, bits, group)
  raise ConfigError("kv_quant", f"unknown method {method!r} (rtn, kivi)")


def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, *,
                    method: str, bits: int, group: int, residual: int,
                    context: int) -> float:
  """Cache bytes per token at `context` tokens, scales/offsets (16-bit) and
  the full-precision residual (bf16) included."""
  per_layer = 2 * n_kv_heads * head_dim                     # k and v entries
  codes = per_layer * bits / 8
  # scale + offset (2 x 16-bit) per group: values (and RTN keys) per token
  # in groups of min(group, H) dims; KIVI keys per channel per `group` tokens
  # (amortized per token: the same count for group <= H).
  half = per_layer / 2
  meta = 2 * 2 * (half / min(group, head_dim) + half / (
      group if method == "kivi" else min(group, head_dim)))
  exact = min(residual, context) / context
  return n_layers * ((1 - exact) * (codes + meta) + exact * per_layer * 2)
