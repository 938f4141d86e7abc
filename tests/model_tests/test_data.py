"""Corpus loading: local files through `datasets`, packaged fallback."""

import pytest

from conftest import shared_path
from palu_jax import data


def test_packaged_wikitext_equals_shared_copy(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))  # no local files there
  packaged = data.load_text("wikitext2")
  with open(shared_path("data/wikitext2/test.txt")) as f:
    assert packaged == f.read()


def test_c4_sample_joins_prompt_and_response():
  text = data.load_text("c4", data_dir_override=shared_path("data"))
  assert text.count("\n\n") >= 199 and len(text) > 100_000


def test_any_jsonl_and_bad_names(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"text": "a b"}\n{"text": "c"}\n')
  assert data.load_text(str(p)) == "a b\n\nc"
  q = tmp_path / "y.jsonl"
  q.write_text('{"body": "a"}\n')
  with pytest.raises(data.DatasetError, match="'text'"):
    data.load_text(str(q))
  with pytest.raises(data.DatasetError, match="unknown dataset"):
    data.load_text("no-such-corpus")


@pytest.mark.parametrize("name", ["wikitext2", "c4", "tinystories",
                                  "wikitext2-calib"])
def test_plain_reader_equals_datasets(name):
  """Hosts without `datasets` read local files directly, to the same text."""
  from palu_jax import data
  path = shared_path("data", data.CORPORA[name][0])
  assert data._read_plain(path) == data._load_local(path)


def test_calibration_text_falls_back_to_the_packaged_copy(tmp_path, monkeypatch):
  """Offline and without ../shared: the hub fails, the packaged validation
  text (identical to the shared file) is used."""
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
  def offline(*a):
    raise ConnectionError("no network")
  monkeypatch.setattr(data, "_load_hub", offline)
  got = data.load_text("wikitext2-calib")
  with open(shared_path("data/wikitext2/valid.tokens.txt")) as f:
    assert got == f.read()
