"""Token sampling: greedy, temperature, top-k and top-p, all traced values.

Sampling settings are arrays, not static arguments, so changing them does not
recompile the generation program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from palu_jax.errors import ConfigError
from palu_jax.fields import check_field_types
from palu_jax.typing import Array


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    check_field_types(self)
    if self.temperature < 0:
      raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ConfigError("top_k", f"must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")

  def as_arrays(self) -> tuple[Array, Array, Array]:
    return (jnp.float32(self.temperature), jnp.int32(self.top_k),
            jnp.float32(self.top_p))


def sample(logits: Array, key: Array, temperature: Array, top_k: Array,
           top_p: Array) -> Array:
  """Draws one token per row.

  Args:
    logits: [B, V] float32.
    key: PRNG key.
    temperature, top_k, top_p: scalars (see SamplingConfig).

  Returns:
    [B] int32 token ids.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Greedy decoding skips the vocabulary sort entirely.
  return jax.lax.cond(temperature > 0,
                      lambda: _draw(logits, key, temperature, top_k, top_p),
                      lambda: greedy)


def _draw(logits, key, temperature, top_k, top_p):
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)
  desc = -jnp.sort(-scaled, axis=-1)                                  # [B, V]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  ranks = jnp.arange(vocab)
  desc = jnp.where(ranks < k, desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  n_keep = jnp.maximum(jnp.sum(keep & (ranks < k), axis=-1), 1)       # [B]
  cutoff = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
  filtered = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
