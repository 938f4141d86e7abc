"""Perplexity with the standard protocol.

Tokenize the whole text, cut non-overlapping windows of `seqlen` tokens (the
partial tail is dropped), and average the next-token NLL over every predicted
position (seqlen - 1 per window). This is the GPTQ/Palu evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from palu_jax.errors import PaluError
from palu_jax.fields import require_positive_int
from palu_jax.losses import next_token_nll


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  perplexity: float
  nll: float          # mean NLL per predicted token (nats)
  windows: int
  tokens: int         # predicted tokens
  seqlen: int


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, state, windows: jax.Array, real: jax.Array
                ) -> jax.Array:
  """windows [B, T], real [B] (0 for padding windows) -> summed NLL of
  tokens 1..T-1 of the real windows (a float32 scalar: replicated, so it
  can be read on every process of a multi-host job)."""
  nll = jnp.sum(next_token_nll(nnx.merge(graphdef, state), windows), axis=-1)
  return jnp.sum(nll * real)


def perplexity(model, token_ids, *, seqlen: int = 2048, batch_size: int = 1,
               limit: int | None = None, progress: bool = True, mesh=None
               ) -> PerplexityResult:
  """Perplexity of `model` on a token stream.

  Args:
    model: a palu_jax model (anything callable as model(tokens)).
    token_ids: 1-D sequence of token ids of the whole corpus.
    seqlen: window length T.
    batch_size: windows per jitted call (the last batch is padded).
    limit: evaluate only the first `limit` windows.
    mesh: a ("data", "model") mesh (`palu_jax.sharding.mesh.make_mesh`):
      the parameters are sharded by their logical axes and each batch of
      windows split over "data" (batch_size a multiple of its size to use
      every device; otherwise the windows are replicated, with a warning).
  """
  require_positive_int("seqlen", seqlen)
  require_positive_int("batch_size", batch_size)
  if limit is not None:
    require_positive_int("limit", limit)
  ids = np.asarray(token_ids, dtype=np.int32)
  n = len(ids) // seqlen
  if limit is not None:
    n = min(n, limit)
  if n == 0:
    raise PaluError(f"corpus has {len(ids)} tokens, fewer than one window of "
                    f"seqlen={seqlen}")
  if seqlen > model.cfg.max_seq_len:
    raise PaluError(f"seqlen={seqlen} exceeds the model context "
                    f"max_seq_len={model.cfg.max_seq_len}")
  windows = ids[:n * seqlen].reshape(n, seqlen)
  from palu_jax.sharding.shard import batch_placer, split_for
  graphdef, state = split_for(model, mesh)
  place = batch_placer(mesh, name="perplexity windows")
  total = 0.0
  bar = tqdm(total=n, desc=f"ppl (seqlen {seqlen})", unit="win",
             disable=not progress)
  for i in range(0, n, batch_size):
    batch = windows[i:i + batch_size]
    real = len(batch)
    if real < batch_size:  # keep one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
    mask = (np.arange(batch_size) < real).astype(np.float32)
    total += float(_window_nll(graphdef, state, place(batch), place(mask)))
    bar.update(real)
  bar.close()
  tokens = n * (seqlen - 1)
  nll = total / tokens
  if not math.isfinite(nll):
    raise PaluError(f"the loss is {nll} (not finite): the model's weights "
                    "or activations hold NaN/inf; check the checkpoint, or "
                    "use --dtype float32 if it overflows in 16 bits")
  return PerplexityResult(perplexity=math.exp(nll), nll=nll, windows=n,
                          tokens=tokens, seqlen=seqlen)
