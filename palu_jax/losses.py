"""Next-token negative log-likelihood, shared by perplexity and calibration."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from palu_jax.typing import Array


def next_token_nll(model, windows: Array) -> Array:
  """windows [B, T] -> [B, T-1] float32 NLL of tokens 1..T-1 (no cache)."""
  logits, _ = model(windows)                           # [B, T, V] f32
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
