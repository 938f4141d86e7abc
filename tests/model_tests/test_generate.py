"""Jitted generation: ragged batches, sampling, EOS, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.errors import GenerationError
from palu_jax.generate import Generator, bucket_length
from palu_jax.sampling import SamplingConfig, sample

from model_tests.test_model import make_model


def greedy_reference(model, prompt, n, width=32):
  """Greedy decoding by repeated full forwards without a cache. Sequences
  are zero-padded to one width (causal attention ignores the padding), so a
  single compiled forward serves every step."""
  forward = jax.jit(lambda x: model(x)[0])
  ids = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(forward(jnp.asarray(padded))[0, len(ids) - 1])))
  return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
  return make_model("gqa_tied")[0]


def test_ragged_batch_greedy_matches_reference(model):
  prompts = [[5, 6, 7], [9, 1, 4, 4, 8, 20, 30, 2 + 40], [11]]
  gen = Generator(model, eos_ids=[])
  outs = gen.generate_ids(prompts, max_new_tokens=10)
  for p, o in zip(prompts, outs):
    assert o == greedy_reference(model, p, 10)


def test_no_recompilation_for_same_bucket(model):
  """Greedy and sampled decoding are one program each per prompt bucket;
  sampling values, seeds and prompt lengths in the bucket reuse them."""
  gen = Generator(model, eos_ids=[])
  gen.generate_ids([[1, 2, 3]], max_new_tokens=8)
  gen.generate_ids([[1, 2, 3]], max_new_tokens=8,
                   sampling=SamplingConfig(temperature=1.0))
  before = gen.compiled_programs()
  gen.generate_ids([[4, 5, 6, 7, 8]], max_new_tokens=8, seed=3,
                   sampling=SamplingConfig(temperature=0.7, top_k=5, top_p=0.9))
  gen.generate_ids([[9] * 16], max_new_tokens=8)
  gen.generate_ids([[9] * 7], max_new_tokens=8, seed=5,
                   sampling=SamplingConfig(temperature=2.0, top_p=0.5))
  assert gen.compiled_programs() == before
  gen.generate_ids([[9] * 17], max_new_tokens=8)  # next bucket: one compile
  assert gen.compiled_programs() == before + 1


def test_eos_stops_each_sequence(model):
  prompts = [[5, 6, 7], [9, 1, 4]]
  free = Generator(model, eos_ids=[]).generate_ids(prompts, max_new_tokens=12)
  eos = free[0][4]  # make sequence 0 stop at its 5th token
  outs = Generator(model, eos_ids=[eos]).generate_ids(prompts, max_new_tokens=12)
  assert outs[0] == free[0][:free[0].index(eos) + 1]
  if eos in free[1]:
    assert outs[1] == free[1][:free[1].index(eos) + 1]
  else:
    assert outs[1] == free[1]


def test_sampling_is_seeded_and_varies(model):
  gen = Generator(model, eos_ids=[])
  cfg = SamplingConfig(temperature=20.0)  # the random model is very peaked
  a = gen.generate_ids([[3, 4]], max_new_tokens=16, sampling=cfg, seed=1)
  b = gen.generate_ids([[3, 4]], max_new_tokens=16, sampling=cfg, seed=1)
  c = gen.generate_ids([[3, 4]], max_new_tokens=16, sampling=cfg, seed=2)
  assert a == b and a != c


def test_streaming_callback_sees_every_token(model):
  seen = []
  gen = Generator(model, eos_ids=[])
  outs = gen.generate_ids([[3, 4], [5]], max_new_tokens=6,
                          on_token=lambda step, ids: seen.append((step, ids.tolist())))
  assert [s for s, _ in seen] == list(range(6))
  assert [ids[0] for _, ids in seen] == outs[0]


def test_sample_filters():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
  top = np.argsort(-np.asarray(logits), axis=-1)
  greedy = np.asarray(top[:, 0])
  keys = jax.random.split(jax.random.key(0), 64)
  many = jax.jit(jax.vmap(sample, in_axes=(None, 0, None, None, None)))
  def draws(t, k, p):  # [64 keys, 4 rows]
    return np.asarray(many(logits, keys, jnp.float32(t), jnp.int32(k),
                           jnp.float32(p)))
  np.testing.assert_array_equal(draws(0.0, 0, 1.0)[0], greedy)
  np.testing.assert_array_equal(draws(1.0, 1, 1.0), np.tile(greedy, (64, 1)))
  np.testing.assert_array_equal(draws(1.0, 0, 1e-6), np.tile(greedy, (64, 1)))
  top3 = draws(5.0, 3, 1.0)
  for row in range(4):
    assert set(top3[:, row]) <= set(top[row, :3].tolist())
    assert len(set(top3[:, row])) > 1
  # top-p at 1 with a high temperature reaches well beyond the top 3.
  assert len(set(draws(5.0, 0, 1.0)[:, 0])) > 3


def test_bad_generation_input(model):
  gen = Generator(model)
  with pytest.raises(GenerationError, match="empty"):
    gen.generate_ids([[1, 2], []], max_new_tokens=4)
  with pytest.raises(GenerationError, match="max_seq_len"):
    gen.generate_ids([[1] * 120], max_new_tokens=16)  # context is 128
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


def test_bucket_length():
  assert bucket_length(1, 1000) == 16
  assert bucket_length(17, 1000) == 32
  assert bucket_length(600, 700) == 700
