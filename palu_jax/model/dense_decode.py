"""Decode attention of the dense (full-KV) model: one new token per
sequence over the token-major cache, on the fastest kernel available.

On a GPU, bf16/fp16 caches go through cuDNN's fused attention
(`jax.nn.dot_product_attention(implementation="cudnn")`, which reads the
[B, S, K, H] cache as it is); elsewhere, and for float32, the jnp softmax
attention of `attention.attend`. The compressed model is always compared
with this path, so its speedups are over the dense model's best kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from palu_jax.typing import Array

IMPLEMENTATIONS = ("cudnn", "xla", None)


def pick(q: Array, implementation: str | None = None) -> str:
  """"cudnn" or "xla" for queries q [B, 1, N, H] (None: cuDNN where it
  runs: a GPU, bf16/fp16, head_dim a multiple of 8 up to 128)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"dense decode implementation must be one of "
                     f"{IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is not None:
    return implementation
  h = q.shape[-1]
  if (jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128):
    return "cudnn"
  return "xla"


def decode_attention(q: Array, k: Array, v: Array, lengths: Array, *,
                     implementation: str = "cudnn") -> Array:
  """q [B, 1, N, H] (rotated), k/v [B, S, K, H] token-major cache, lengths
  [B] visible rows (the new token's position + 1) -> [B, 1, N, H]."""
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths.astype(jnp.int32),
      implementation=implementation)
