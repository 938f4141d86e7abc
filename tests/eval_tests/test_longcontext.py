"""Long-context pieces: text metrics on hand-made examples, middle
truncation, the LongBench loader and the needle test on a tiny model."""

import json

import pytest

from eval.longcontext import longbench, needle, text_metrics
from model_tests.test_model import make_model
from palu_jax.data import DatasetError
from palu_jax.errors import ConfigError


def test_token_f1_hand_examples():
  assert text_metrics.token_f1("The Eiffel Tower!", "eiffel tower") == 1.0
  # pred {paris, france}, gold {paris}: P 1/2, R 1 -> F1 2/3
  assert abs(text_metrics.token_f1("Paris, France", "Paris") - 2 / 3) < 1e-12
  assert text_metrics.token_f1("London", "Paris") == 0.0
  assert text_metrics.best_over_answers(text_metrics.token_f1, "a cat",
                                        ["dog", "cat"]) == 1.0


def test_rouge_l_hand_examples():
  # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6
  got = text_metrics.rouge_l("the cat sat on the mat",
                             "the cat lay on the mat")
  assert abs(got - 5 / 6) < 1e-12
  # LCS 2 ("a c"), P 2/3, R 2/4 -> F 4/7
  assert abs(text_metrics.rouge_l("a b c", "a x c y") - 4 / 7) < 1e-12
  assert text_metrics.rouge_l("", "x") == 0.0


def test_classification_score():
  classes = ["location", "other location", "person"]
  assert text_metrics.classification_score("person", "person", classes) == 1.0
  assert text_metrics.classification_score("a person or location", "person",
                                           classes) == 0.5
  assert text_metrics.classification_score("other location", "other location",
                                           classes) == 1.0
  assert text_metrics.classification_score("number", "person", classes) == 0.0


def test_middle_truncation_keeps_both_ends():
  ids = list(range(100))
  assert longbench.middle_truncate(ids, 200) == ids
  cut = longbench.middle_truncate(ids, 11)
  assert cut == list(range(5)) + list(range(94, 100))


def test_longbench_loader(tmp_path):
  d = tmp_path / "longbench"
  d.mkdir()
  rec = {"context": "ctx", "input": "q?", "answers": ["yes"], "length": 3}
  (d / "hotpotqa.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec))
  (d / "notatask.jsonl").write_text("")
  assert longbench.available_tasks(str(tmp_path)) == ["hotpotqa"]
  assert len(longbench.load_records("hotpotqa", str(tmp_path))) == 2
  assert longbench.score_prediction("hotpotqa", " Yes.", rec) == 1.0
  (d / "qasper.jsonl").write_text(json.dumps({"context": "c"}) + "\n")
  with pytest.raises(DatasetError, match="lacks"):
    longbench.load_records("qasper", str(tmp_path))
  with pytest.raises(DatasetError, match="no such file"):
    longbench.load_records("musique", str(tmp_path))


class _WordTokenizer:
  """Deterministic toy tokenizer: one id per whitespace word (mod 50)."""

  def encode(self, text, add_bos=None):
    return [sum(map(ord, w)) % 50 for w in text.split()]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sample_length_and_position(depth):
  tok = _WordTokenizer()
  s = needle.make_sample(tok, 300, depth, seed=1)
  assert 250 <= len(s.prompt) + len(s.answer) <= 300
  assert len(s.answer) == 1


def test_needle_sample_places_the_needle_by_depth():
  class Tok(_WordTokenizer):
    def encode(self, text, add_bos=None):
      self.last = text
      return super().encode(text)
  tok = Tok()
  starts = []
  for depth in (0.0, 0.5, 1.0):
    needle.make_sample(tok, 400, depth, seed=2)
    starts.append(tok.last.index("The secret code") / len(tok.last))
  assert starts[0] < 0.05 and 0.35 < starts[1] < 0.65 and starts[2] > 0.85
  with pytest.raises(ConfigError, match="depth"):
    needle.make_sample(tok, 400, 1.5, seed=0)


def test_needle_eval_skips_lengths_past_the_context():
  model, _, hf = make_model("mha")
  out = needle.needle_eval(model, _WordTokenizer(), context_lens=(40, 10**6),
                           depths=(0.5,), samples=2, progress=False)
  assert out["skipped_lengths"] == [10**6]
  assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0
