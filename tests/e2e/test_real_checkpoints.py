"""Real checkpoints against independent implementations.

Golden values:
* stories260K text: the expected output of llama2.c's `test_all.py`
  (greedy from BOS, 200 sampled tokens), as reproduced in shared/DATA.md.
* tests/golden/stories260k.json: a PyTorch port of llama2.c run.c with
  llama2.c's encode() (tests/golden/make_golden.py).
* tests/golden/smollm2_135m.json: Hugging Face transformers + PyTorch, fp32,
  loading the same GGUF (tests/golden/make_golden.py).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from eval.perplexity import perplexity
from palu_jax.api import load_model
from palu_jax.generate import Generator

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")

LLAMA2C_EXPECTED = (
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball. She wanted to play "
    "with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to "
    "play with your ball, but I can't find it.\"\nLily was sad and didn't know "
    "what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she")


def _golden(name):
  with open(os.path.join(GOLDEN, name)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def stories():
  return load_model(shared_path("models/stories260K/stories260K.bin"),
                    dtype="float32")


def test_stories260k_greedy_matches_llama2c(stories):
  model, tok = stories
  out = Generator(model).generate_ids([[tok.bos_id]], max_new_tokens=200)[0]
  text = tok.decode(out)
  assert text == LLAMA2C_EXPECTED
  assert len(text.encode()) == 464


def test_stories260k_tokens_logits_and_perplexity(stories):
  model, tok = stories
  g = _golden("stories260k.json")
  text = open(shared_path("data/tinystories/valid.txt")).read()
  ids = tok.encode(text[:g["text_head_chars"]], add_bos=False)
  assert ids == g["text_head_ids"]
  logits, _ = model(jnp.asarray([[tok.bos_id] + ids[:255]]))
  np.testing.assert_allclose(logits[0, -1, :8], g["logits_bos_prefix_255_last8"],
                             rtol=1e-4, atol=1e-4)
  ref = g["ppl_head_seqlen128"]
  got = perplexity(model, ids, seqlen=128, batch_size=4, progress=False)
  assert got.windows == ref["windows"]
  assert abs(got.perplexity / ref["perplexity"] - 1) < 1e-4


@pytest.fixture(scope="module")
def smollm2():
  try:
    return load_model("smollm2-135m", dtype="float32")
  except Exception as e:  # package missing on a bare machine
    pytest.skip(f"SmolLM2-135M unavailable: {e}")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
  _, tok = smollm2
  g = _golden("smollm2_135m.json")
  for p in g["prompts"]:
    assert tok.encode(p["text"]) == p["ids"]
  text = open(shared_path("data/wikitext2/test.txt")).read()
  ids = tok.encode(text)
  assert ids[:64] == g["wikitext2_first_ids"]
  assert len(ids) == g["wikitext2_num_tokens"]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
  model, _ = smollm2
  g = _golden("smollm2_135m.json")
  prompts = [p["ids"] for p in g["prompts"]]
  outs = Generator(model, eos_ids=[]).generate_ids(prompts, max_new_tokens=32)
  for p, out in zip(g["prompts"], outs):
    assert out == p["greedy_32"], p["text"]
  logits, _ = model(jnp.asarray([prompts[0]]))
  top5 = np.argsort(-np.asarray(logits[0, -1]))[:5].tolist()
  assert top5 == g["prompts"][0]["last_logits_top5"]
  np.testing.assert_allclose(logits[0, -1, :8], g["prompts"][0]["last_logits_first8"],
                             rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_smollm2_perplexity_slice_matches_transformers(smollm2):
  model, tok = smollm2
  g = _golden("smollm2_135m.json")["ppl_slice"]
  text = open(shared_path("data/wikitext2/test.txt")).read()
  ids = tok.encode(text)
  got = perplexity(model, ids, seqlen=g["seqlen"], limit=g["windows"],
                   batch_size=2, progress=False)
  assert abs(got.perplexity / g["perplexity"] - 1) < 1e-3
