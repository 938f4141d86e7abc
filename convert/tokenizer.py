"""Tokenizers for every supported checkpoint format, behind one interface.

* `HFTokenizer`: a `tokenizers.Tokenizer` (from `tokenizer.json`, or built from
  a GGUF's gpt2-style BPE vocabulary and merges).
* `ScoreBPETokenizer`: SentencePiece-style BPE driven by piece scores, as in
  llama2.c's `tokenizer.bin` and llama-style GGUF vocabularies.
* `SentencePieceTokenizer`: a SentencePiece `.model` file.

Each one can `save(directory)` into a converted model directory and is read
back by `load_tokenizer(directory)`.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import struct
from typing import Protocol, Sequence

from convert.errors import CheckpointError


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_ids: list[int]
  add_bos: bool
  chat_template: str | None

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def save(self, directory: str) -> None: ...


# ----------------------------------------------------------------------------
# Hugging Face `tokenizers`


class HFTokenizer:
  """Wraps `tokenizers.Tokenizer` plus the special-token facts around it."""

  CONFIG_NAME = "tokenizer_config.json"

  def __init__(self, tok, *, bos_id=None, eos_ids=(), add_bos=False,
               chat_template=None):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = bos_id
    self.eos_ids = list(eos_ids)
    self.add_bos = add_bos
    self.chat_template = chat_template

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def save(self, directory: str) -> None:
    self.tok.save(os.path.join(directory, "tokenizer.json"))
    meta = {"bos_id": self.bos_id, "eos_ids": self.eos_ids,
            "add_bos": self.add_bos, "chat_template": self.chat_template}
    with open(os.path.join(directory, self.CONFIG_NAME), "w") as f:
      json.dump(meta, f, indent=1)

  @classmethod
  def from_dir(cls, directory: str) -> "HFTokenizer":
    import tokenizers
    path = os.path.join(directory, "tokenizer.json")
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception
      raise CheckpointError(path, f"cannot parse tokenizer: {e}") from e
    meta = {}
    cfg_path = os.path.join(directory, cls.CONFIG_NAME)
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        meta = json.load(f)
    if "bos_id" in meta:  # written by `save`
      return cls(tok, bos_id=meta["bos_id"], eos_ids=meta["eos_ids"],
                 add_bos=meta["add_bos"], chat_template=meta["chat_template"])
    # A transformers tokenizer_config.json: special tokens are strings.
    def tid(name):
      t = meta.get(name)
      t = t.get("content") if isinstance(t, dict) else t
      return None if t is None else tok.token_to_id(t)
    eos = tid("eos_token")
    return cls(tok, bos_id=tid("bos_token"), eos_ids=[] if eos is None else [eos],
               add_bos=bool(meta.get("add_bos_token", False)),
               chat_template=meta.get("chat_template"))


_PRE_TOKENIZER_REGEX = {
    # llama.cpp pre-tokenizer names -> split regex (None: GPT-2 byte level).
    "gpt2": None, "default": None, "smollm": None,
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def hf_tokenizer_from_gguf_bpe(tokens, merges, token_types, pre: str, *,
                               bos_id, eos_ids, add_bos, chat_template, path):
  """Builds a byte-level BPE `tokenizers.Tokenizer` from GGUF vocab arrays."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  if pre not in _PRE_TOKENIZER_REGEX:
    raise CheckpointError(path, f"unsupported GGUF pre-tokenizer {pre!r} "
                          f"(supported: {sorted(_PRE_TOKENIZER_REGEX)})",
                          field="tokenizer.ggml.pre")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs,
                                        ignore_merges=pre == "llama-bpe"))
  regex = _PRE_TOKENIZER_REGEX[pre]
  if regex is None:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # SmolLM splits every digit on its own before byte-level BPE.
    tok.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre == "smollm" else byte_level)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  control = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, token_types) if ty == 3]
  tok.add_special_tokens(control)
  return HFTokenizer(tok, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                     chat_template=chat_template)


# ----------------------------------------------------------------------------
# Score-driven BPE (llama2.c / SentencePiece-style vocabularies)


class ScoreBPETokenizer:
  """SentencePiece-style BPE: merge the adjacent pair with the best score.

  This is llama2.c's `encode` (pieces hold real spaces, not '▁'): a dummy
  space prefix, one piece per UTF-8 character (byte fallback `<0xNN>` at
  id 3 + byte), then greedy highest-score merges (leftmost on ties).
  """

  FILE_NAME = "tokenizer.bin"

  def __init__(self, pieces: list[str], scores: list[float], *, bos_id=1,
               eos_ids=(2,), add_bos=True, add_space_prefix=True,
               chat_template=None):
    self.pieces = pieces
    self.scores = scores
    self.vocab_size = len(pieces)
    self.bos_id, self.eos_ids = bos_id, list(eos_ids)
    self.add_bos, self.add_space_prefix = add_bos, add_space_prefix
    self.chat_template = chat_template
    self._ids = {}
    for i, p in enumerate(pieces):
      self._ids.setdefault(p, i)
    self._byte_ids = {}
    for b in range(256):
      i = self._ids.get(f"<0x{b:02X}>")
      if i is not None:
        self._byte_ids[b] = i
    # Words can be encoded independently iff no piece has a space after a
    # non-space character (true of SentencePiece vocabularies).
    self._word_split = not any(
        " " in p.lstrip(" ") for p in pieces if not p.startswith("<"))
    self._memo: dict[str, list[int]] = {}

  @classmethod
  def from_llama2c(cls, path: str) -> "ScoreBPETokenizer":
    if not os.path.exists(path):
      raise CheckpointError(path, "tokenizer file does not exist")
    with open(path, "rb") as f:
      data = f.read()
    pieces, scores, pos = [], [], 4
    try:
      while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        if n < 0 or pos + 8 + n > len(data):
          raise struct.error("piece overruns the file")
        pieces.append(data[pos + 8:pos + 8 + n].decode("utf-8", "replace"))
        scores.append(score)
        pos += 8 + n
    except struct.error as e:
      raise CheckpointError(path, f"truncated or corrupt llama2.c tokenizer "
                            f"at byte {pos} (token {len(pieces)}): {e}") from e
    if len(pieces) < 3:
      raise CheckpointError(path, "llama2.c tokenizer holds fewer than 3 tokens")
    return cls(pieces, scores)

  def _encode_word(self, text: str) -> list[int]:
    ids = []
    for ch in text:
      i = self._ids.get(ch)
      if i is not None:
        ids.append(i)
      else:
        ids.extend(self._byte_ids.get(b, 0) for b in ch.encode("utf-8"))
    # Greedy merging with a heap of candidate pairs; stale entries are skipped.
    toks = [self.pieces[i] for i in ids]
    alive = [True] * len(ids)
    nxt = list(range(1, len(ids) + 1))
    prv = list(range(-1, len(ids) - 1))
    heap = []
    def push(a):
      b = nxt[a]
      if b < len(ids):
        j = self._ids.get(toks[a] + toks[b])
        if j is not None:
          heapq.heappush(heap, (-self.scores[j], a, toks[a], toks[b], j))
    for a in range(len(ids) - 1):
      push(a)
    while heap:
      _, a, ta, tb, j = heapq.heappop(heap)
      b = nxt[a] if alive[a] else len(ids)
      if b >= len(ids) or toks[a] != ta or toks[b] != tb:
        continue
      ids[a], toks[a] = j, ta + tb
      alive[b] = False
      nxt[a] = nxt[b]
      if nxt[b] < len(ids):
        prv[nxt[b]] = a
      push(a)
      if prv[a] >= 0:
        push(prv[a])
    return [i for i, keep in zip(ids, alive) if keep]

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = []
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids.append(self.bos_id)
    if not text:
      return ids
    if self.add_space_prefix:
      text = " " + text
    if not self._word_split:
      return ids + self._encode_word(text)
    start = 0
    for k in range(1, len(text) + 1):
      if k == len(text) or (text[k] == " " and text[k - 1] != " "):
        word = text[start:k]
        got = self._memo.get(word)
        if got is None:
          got = self._memo[word] = self._encode_word(word)
        ids.extend(got)
        start = k
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    out, prev = bytearray(), None
    for i in ids:
      if i == self.bos_id or i in self.eos_ids:
        prev = i
        continue
      p = self.pieces[i]
      if prev == self.bos_id or (prev is None and self.add_space_prefix):
        p = p[1:] if p.startswith(" ") else p
      if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
        out.append(int(p[3:5], 16))
      else:
        out.extend(p.encode("utf-8"))
      prev = i
    return out.decode("utf-8", "replace")

  def save(self, directory: str) -> None:
    """Writes llama2.c format plus a JSON sidecar for the special tokens."""
    blobs = [p.encode("utf-8") for p in self.pieces]
    with open(os.path.join(directory, self.FILE_NAME), "wb") as f:
      f.write(struct.pack("<i", max(len(b) for b in blobs)))
      for b, s in zip(blobs, self.scores):
        f.write(struct.pack("<fi", s, len(b)) + b)
    meta = {"bos_id": self.bos_id, "eos_ids": self.eos_ids,
            "add_bos": self.add_bos, "add_space_prefix": self.add_space_prefix,
            "chat_template": self.chat_template}
    with open(os.path.join(directory, "tokenizer_meta.json"), "w") as f:
      json.dump(meta, f, indent=1)

  @classmethod
  def from_dir(cls, directory: str) -> "ScoreBPETokenizer":
    tok = cls.from_llama2c(os.path.join(directory, cls.FILE_NAME))
    meta_path = os.path.join(directory, "tokenizer_meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      tok = cls(tok.pieces, tok.scores, **meta)
    return tok


# ----------------------------------------------------------------------------
# SentencePiece .model


class SentencePieceTokenizer:
  FILE_NAME = "tokenizer.model"

  def __init__(self, path: str, *, add_bos: bool = True, chat_template=None):
    import sentencepiece
    if not os.path.exists(path):
      raise CheckpointError(path, "tokenizer file does not exist")
    self.path = path
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise CheckpointError(path, f"not a SentencePiece model: {e}") from e
    self.vocab_size = self.sp.GetPieceSize()
    bos, eos = self.sp.bos_id(), self.sp.eos_id()
    self.bos_id = None if bos < 0 else bos
    self.eos_ids = [] if eos < 0 else [eos]
    self.add_bos = add_bos
    self.chat_template = chat_template

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = list(self.sp.EncodeAsIds(text)) if text else []
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])

  def save(self, directory: str) -> None:
    shutil.copyfile(self.path, os.path.join(directory, self.FILE_NAME))


# ----------------------------------------------------------------------------
# Discovery


def tokenizer_from_gguf(reader, path: str) -> Tokenizer:
  """The tokenizer stored in a GGUF file's metadata."""
  from convert.gguf_file import field
  kind = field(reader, "tokenizer.ggml.model", path)
  tokens = field(reader, "tokenizer.ggml.tokens", path)
  def opt(key, default):
    f = reader.fields.get(key)
    return default if f is None else f.contents()
  bos, eos = opt("tokenizer.ggml.bos_token_id", None), opt(
      "tokenizer.ggml.eos_token_id", None)
  eos_ids = [] if eos is None else [int(eos)]
  template = opt("tokenizer.chat_template", None)
  if kind == "gpt2":
    return hf_tokenizer_from_gguf_bpe(
        tokens, field(reader, "tokenizer.ggml.merges", path),
        opt("tokenizer.ggml.token_type", [1] * len(tokens)),
        opt("tokenizer.ggml.pre", "gpt2"), bos_id=bos, eos_ids=eos_ids,
        add_bos=bool(opt("tokenizer.ggml.add_bos_token", False)),
        chat_template=template, path=path)
  if kind == "llama":
    scores = opt("tokenizer.ggml.scores", [0.0] * len(tokens))
    return ScoreBPETokenizer(
        [t.replace("\u2581", " ") for t in tokens], list(scores),
        bos_id=bos, eos_ids=eos_ids,
        add_bos=bool(opt("tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(opt("tokenizer.ggml.add_space_prefix", True)),
        chat_template=template)
  raise CheckpointError(path, f"unsupported GGUF tokenizer model {kind!r} "
                        "(supported: gpt2, llama)", field="tokenizer.ggml.model")


def load_tokenizer(path: str) -> Tokenizer:
  """Finds the tokenizer of a checkpoint directory or file.

  Args:
    path: a directory (converted model or HF checkpoint), a `.gguf`, a
      llama2.c tokenizer `.bin`, or a SentencePiece `.model`.
  """
  if os.path.isdir(path):
    for name, make in (("tokenizer.json", HFTokenizer.from_dir),
                       (ScoreBPETokenizer.FILE_NAME, ScoreBPETokenizer.from_dir),
                       (SentencePieceTokenizer.FILE_NAME,
                        lambda d: SentencePieceTokenizer(os.path.join(d, name)))):
      if os.path.exists(os.path.join(path, name)):
        return make(path)
    raise CheckpointError(path, "no tokenizer found (looked for tokenizer.json,"
                          " tokenizer.bin, tokenizer.model)")
  if not os.path.exists(path):
    raise CheckpointError(path, "tokenizer file does not exist")
  if path.endswith(".gguf"):
    from convert.gguf_file import open_gguf
    return tokenizer_from_gguf(open_gguf(path), path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".bin"):
    return ScoreBPETokenizer.from_llama2c(path)
  if path.endswith(".json"):
    return HFTokenizer.from_dir(os.path.dirname(path) or ".")
  raise CheckpointError(path, "unknown tokenizer format (expected "
                        "tokenizer.json, .gguf, .model or llama2.c .bin)")
