"""Fine-tuning data: a token stream packed into fixed-length sequences and
a batch order that depends only on (seed, step), so a resumed run reads
exactly the batches an uninterrupted one would."""

from __future__ import annotations

import numpy as np

from palu_jax.errors import PaluError


def pack(token_ids, seqlen: int) -> np.ndarray:
  """Consecutive, non-overlapping [N, seqlen] int32 sequences of the stream
  (the tail shorter than seqlen is dropped)."""
  ids = np.asarray(token_ids, np.int32)
  n = len(ids) // seqlen
  if n < 1:
    raise PaluError(f"fine-tuning text has {len(ids)} tokens, fewer than one "
                    f"sequence of {seqlen}")
  return ids[:n * seqlen].reshape(n, seqlen)


def batch_at(sequences: np.ndarray, step: int, batch: int, seed: int
             ) -> np.ndarray:
  """The [batch, T] sequences of `step`: epochs walk a seeded permutation
  (a fresh one per epoch); a batch may straddle two epochs."""
  n = len(sequences)
  start = step * batch
  rows = []
  for i in range(start, start + batch):
    epoch, at = divmod(i, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows.append(order[at])
  return sequences[np.asarray(rows)]
