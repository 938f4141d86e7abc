"""Zero-shot scoring, task loaders and metrics.

Golden log-likelihoods come from `numpy_ref.forward` (an independent NumPy
model) summed one request at a time, with no batching or padding."""

import numpy as np
import pytest

import numpy_ref
from conftest import shared_path
from eval.zeroshot import scoring
from eval.zeroshot.metrics import choice_accuracies, summarize
from eval.zeroshot.scoring import Score, encode_request, score_token_pairs
from eval.zeroshot.tasks import (TASKS, Item, load_task,
                                 parse_adapters_record, winogrande_item)
from model_tests.test_model import make_model


def _numpy_score(w, hf, ctx, cont):
  whole = np.array(list(ctx) + list(cont))
  logits = numpy_ref.forward(w, hf, whole[:-1])
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  pos = np.arange(len(ctx) - 1, len(whole) - 1)
  picked = logp[pos, whole[pos + 1]]
  greedy = np.all(np.argmax(logits[pos], -1) == whole[pos + 1])
  return float(picked.sum()), bool(greedy)


def _random_pairs(vocab, n, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, vocab, rng.integers(1, 40)).tolist(),
           rng.integers(0, vocab, rng.integers(1, 6)).tolist())
          for _ in range(n)]


def test_scores_equal_unbatched_numpy_loglikelihood():
  model, w, hf = make_model("gqa_tied")
  pairs = _random_pairs(hf["vocab_size"], 9)
  got = score_token_pairs(model, pairs, batch_size=4, progress=False)
  for (ctx, cont), s in zip(pairs, got):
    lp, greedy = _numpy_score(w, hf, ctx, cont)
    assert s.tokens == len(cont)
    assert abs(s.logprob - lp) < 1e-4 * max(1.0, abs(lp))
    assert s.is_greedy == greedy


def test_greedy_flag_is_true_for_the_models_own_argmax():
  model, w, hf = make_model("mha")
  ctx = [3, 9, 27, 1]
  logits = numpy_ref.forward(w, hf, np.array(ctx))
  best = int(np.argmax(logits[-1]))
  worst = int(np.argmin(logits[-1]))
  got = score_token_pairs(model, [(ctx, [best]), (ctx, [worst])],
                          progress=False)
  assert got[0].is_greedy and not got[1].is_greedy


@pytest.mark.parametrize("batch_size,max_tokens,multiple",
                         [(1, 65536, 64), (3, 96, 64), (16, 65536, 32)])
def test_padding_and_bucketing_do_not_change_scores(monkeypatch, batch_size,
                                                    max_tokens, multiple):
  model, _, hf = make_model("gqa_tied")
  pairs = _random_pairs(hf["vocab_size"], 11, seed=3)
  ref = score_token_pairs(model, pairs, batch_size=1, progress=False)
  orig = scoring.bucket_length
  monkeypatch.setattr(scoring, "bucket_length",
                      lambda n: orig(n, multiple=multiple))
  got = score_token_pairs(model, pairs, batch_size=batch_size,
                          max_batch_tokens=max_tokens, progress=False)
  for a, b in zip(ref, got):
    assert abs(a.logprob - b.logprob) < 1e-5 * max(1.0, abs(a.logprob))
    assert a.is_greedy == b.is_greedy


def test_long_rows_keep_their_last_tokens():
  model, w, hf = make_model("mha")        # max_seq_len of the test config
  n = model.cfg.max_seq_len
  ctx = list(np.arange(n + 20) % hf["vocab_size"])
  cont = [5, 6]
  got = score_token_pairs(model, [(ctx, cont)], progress=False)[0]
  kept = (ctx + cont)[-(n + 1):]
  lp, _ = _numpy_score(w, hf, kept[:-2], kept[-2:])
  assert abs(got.logprob - lp) < 1e-4 * max(1.0, abs(lp))


class _CharTokenizer:
  """One token per character, so the encodings are easy to state."""

  def encode(self, text, add_bos=None):
    return [ord(c) for c in text]


def test_encode_request_moves_trailing_space_to_continuation():
  ctx, cont = encode_request(_CharTokenizer(), "Answer: ", "yes")
  assert ctx == [ord(c) for c in "Answer:"]
  assert cont == [ord(c) for c in " yes"]


def test_winogrande_partial_scoring():
  item = winogrande_item("The cup fell because _ was slippery.",
                         ["the table", "the cup"], 1)
  assert item.requests == (("The cup fell because the table",
                            " was slippery."),
                           ("The cup fell because the cup",
                            " was slippery."))


def test_adapters_record_parsing():
  rec = {"instruction": "Please choose the correct answer to the question: "
         "What is 2+2?\n\nAnswer1: three Answer2: four Answer3: five"
         "\n\nAnswer format: answer1/answer2/answer3",
         "answer": "answer2"}
  assert parse_adapters_record(rec, "x") == ("What is 2+2?",
                                             ["three", "four", "five"], 1)


# counts from shared/DATA.md
@pytest.mark.parametrize("task,count,choices", [
    ("piqa", 1838, {2}), ("arc_easy", 2376, {3, 4, 5}),
    ("arc_challenge", 1172, {3, 4, 5}), ("hellaswag", 10042, {4}),
    ("winogrande", 1267, {2}), ("openbookqa", 500, {4})])
def test_task_loaders_parse_the_shipped_files(task, count, choices):
  shared_path("data", "zeroshot")
  items = load_task(task)
  assert len(items) == count == TASKS[task][3]
  assert {len(i.requests) for i in items} <= choices
  assert all(0 <= i.label < len(i.requests) for i in items)
  assert all(c.startswith(" ") or task == "winogrande"
             for i in items[:50] for _, c in i.requests)
  assert len(load_task(task, limit=7)) == 7


def test_hellaswag_labels_match_data_md():
  shared_path("data", "zeroshot")
  labels = np.bincount([i.label for i in load_task("hellaswag")])
  assert labels.tolist() == [2515, 2485, 2584, 2458]


def test_acc_and_acc_norm_on_hand_made_scores():
  # choice 0 is short with a higher total; per character, choice 1 wins
  item = Item(requests=(("q", " a"), ("q", " bbbbbbbbbb")), label=1,
              choice_lengths=(1, 10))
  scores = [Score(-2.0, False, 1), Score(-5.0, False, 3)]
  assert choice_accuracies(item, scores) == (0.0, 1.0)
  out = summarize([item, item], [scores, scores[::-1]])
  assert out["n"] == 2
  assert out["acc"] == 0.5            # second item: choice 1 has -2.0
  assert out["acc_norm"] == 1.0       # there -5/1 < -2/10: choice 1 again
