"""Batched, jitted log-likelihoods of continuations (lm-eval's
`loglikelihood` request type).

A request (context, continuation) is tokenized as lm-eval does it: trailing
spaces of the context move to the continuation, the pair is encoded whole,
and the continuation tokens are those past the context's own encoding. The
model reads context + continuation minus its last token and the log-
probabilities of the continuation tokens are summed; `is_greedy` says
whether each of them is also the argmax.

Requests are sorted by length and cut into batches padded to a few bucket
lengths, so only a handful of shapes compile. Padding goes on the right of
a causal model, and padded rows and positions carry zero weight, so
neither changes any score (tests check this).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from palu_jax.errors import PaluError


@dataclasses.dataclass(frozen=True)
class Score:
  logprob: float      # summed over the continuation tokens (nats)
  is_greedy: bool     # every continuation token is the argmax
  tokens: int         # continuation tokens scored


def encode_request(tokenizer, context: str, continuation: str, *,
                   add_bos: bool = False) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval's `_encode_pair`."""
  spaces = len(context) - len(context.rstrip(" "))
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tokenizer.encode(context + continuation, add_bos=add_bos)
  ctx = tokenizer.encode(context, add_bos=add_bos)
  if not ctx:
    raise PaluError("an empty context needs a BOS-adding tokenizer to score "
                    "its continuation")
  return ctx, whole[len(ctx):]


def bucket_length(n: int, multiple: int = 64) -> int:
  """Padded length of a row of n tokens: 32, then multiples of `multiple`
  (every bucket is a multiple of 32, the token-group size of the simulated
  KIVI key quantization)."""
  if n <= 32:
    return 32
  return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef, state, tokens, targets, weights):
  """tokens/targets/weights [B, T] -> summed log-prob [B] (f32) over the
  positions of weight 1, and whether all of them are greedy [B]."""
  logits, _ = nnx.merge(graphdef, state)(tokens)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
  return jnp.sum(picked * weights, axis=-1), jnp.all(greedy, axis=-1)


def score_token_pairs(model, pairs: list[tuple[list[int], list[int]]], *,
                      batch_size: int = 16, max_batch_tokens: int = 65536,
                      progress: bool = True, desc: str = "loglikelihood",
                      mesh=None) -> list[Score]:
  """Scores (context ids, continuation ids) pairs, in input order.

  A batch holds up to `batch_size` rows and `max_batch_tokens` padded
  tokens (long rows go fewer at a time). Rows longer than the model's
  context keep their last max_seq_len + 1 tokens (lm-eval's left
  truncation). With `mesh`, the parameters are sharded and each batch's
  rows split over "data" (batches rounded to a multiple of its size).
  """
  from palu_jax.sharding.shard import batch_placer, split_for, to_host
  max_len = model.cfg.max_seq_len
  rows = []
  for ctx, cont in pairs:
    if not cont:
      raise PaluError("a continuation encodes to no tokens")
    whole = (list(ctx) + list(cont))[-(max_len + 1):]
    rows.append((whole[:-1], whole[1:], len(cont)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  graphdef, state = split_for(model, mesh)
  place = batch_placer(mesh, name="zero-shot rows")
  rows_per = 1 if mesh is None else mesh.shape["data"]
  out: list[Score | None] = [None] * len(rows)
  bar = tqdm(total=len(rows), desc=desc, unit="req", disable=not progress)
  start = 0
  while start < len(order):
    width = min(bucket_length(len(rows[order[start]][0])), max_len)
    size = max(1, min(batch_size, max_batch_tokens // width))
    size = max(rows_per, size // rows_per * rows_per)
    idx = order[start:start + size]
    tokens = np.zeros((size, width), np.int32)
    targets = np.zeros((size, width), np.int32)
    weights = np.zeros((size, width), np.float32)
    for r, i in enumerate(idx):
      inp, tgt, n = rows[i]
      tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      weights[r, len(tgt) - n:len(tgt)] = 1.0
    lp, greedy = _score_rows(graphdef, state, place(tokens), place(targets),
                             place(weights))
    lp, greedy = to_host(lp), to_host(greedy)
    for r, i in enumerate(idx):
      out[i] = Score(float(lp[r]), bool(greedy[r]), rows[i][2])
    bar.update(len(idx))
    start += size
  bar.close()
  return out


def score_requests(model, tokenizer, requests: list[tuple[str, str]], *,
                   add_bos: bool = False, **kw) -> list[Score]:
  """Scores (context, continuation) text pairs (see the module docstring)."""
  return score_token_pairs(
      model, [encode_request(tokenizer, c, x, add_bos=add_bos)
              for c, x in requests], **kw)
