"""Perplexity protocol against a direct NumPy computation."""

import math

import numpy as np
import pytest

import numpy_ref
from eval.perplexity import perplexity
from model_tests.test_model import make_model
from palu_jax.errors import PaluError


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_numpy(batch_size):
  model, w, hf = make_model("gqa_tied")
  ids = np.random.default_rng(0).integers(0, hf["vocab_size"], 5 * 16 + 7)
  got = perplexity(model, ids, seqlen=16, batch_size=batch_size, limit=4,
                   progress=False)
  total = 0.0
  for i in range(4):  # the partial tail and the 5th window are not used
    win = ids[i * 16:(i + 1) * 16]
    logits = numpy_ref.forward(w, hf, win)[:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) \
        + logits.max(-1)
    total += np.sum(logz - logits[np.arange(15), win[1:]])
  want = math.exp(total / (4 * 15))
  assert got.windows == 4 and got.tokens == 60
  assert abs(got.perplexity / want - 1) < 1e-5


def test_too_short_corpus():
  model, _, _ = make_model("mha")
  with pytest.raises(PaluError, match="fewer than one window"):
    perplexity(model, [1, 2, 3], seqlen=16, progress=False)
