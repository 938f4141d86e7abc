"""Tokenizers: the llama2.c encoder against SentencePiece, and save/load."""

import pytest

from conftest import shared_path
from convert import load_tokenizer
from convert.tokenizer import ScoreBPETokenizer, SentencePieceTokenizer

TEXTS = ["Hello world", "Once upon a time, there was a little girl named Lily.",
         "  two leading spaces and numbers 12345 and ünïcödé ✓",
         "tabs\tand\nnew lines\n\nend."]


def test_llama2c_bin_encoder_matches_sentencepiece():
  """The same Llama-2 vocabulary as a SentencePiece .model (encoded by the
  sentencepiece library) and as llama2.c's tokenizer.bin (our encoder)."""
  sp = SentencePieceTokenizer(shared_path("models/llama2_tokenizer/tokenizer.model"))
  bpe = load_tokenizer(shared_path("models/llama2_tokenizer/tokenizer.bin"))
  for text in TEXTS:
    assert bpe.encode(text) == sp.encode(text), text
    assert bpe.decode(bpe.encode(text)) == sp.decode(sp.encode(text))


def test_score_bpe_save_load_round_trip(tmp_path):
  tok = load_tokenizer(shared_path("models/stories260K/tok512.bin"))
  tok.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert isinstance(again, ScoreBPETokenizer)
  for text in TEXTS:
    assert again.encode(text) == tok.encode(text)
  assert (again.bos_id, again.eos_ids) == (tok.bos_id, tok.eos_ids)


def test_sentencepiece_save_load_round_trip(tmp_path):
  sp = SentencePieceTokenizer(shared_path("models/llama2_tokenizer/tokenizer.model"))
  sp.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert again.encode(TEXTS[1]) == sp.encode(TEXTS[1])


@pytest.mark.slow
def test_gguf_bpe_tokenizer_save_load_and_chat(tmp_path):
  from convert.load import resolve_source
  from eval.cli import render_chat
  try:
    tok = load_tokenizer(resolve_source("smollm2-135m"))
  except Exception as e:
    pytest.skip(f"SmolLM2-135M unavailable: {e}")
  tok.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  for text in TEXTS:
    assert again.encode(text) == tok.encode(text)
  assert again.chat_template == tok.chat_template
  chat = render_chat(tok, "What is 2+2?")
  assert chat.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                       "<|im_start|>assistant\n")
