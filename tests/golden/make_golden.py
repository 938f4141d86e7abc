"""Regenerates the golden values in tests/golden/*.json.

Independent of palu_jax: it runs Hugging Face transformers + PyTorch (fp32,
CPU) on the SmolLM2-135M GGUF, and a from-scratch PyTorch port of llama2.c's
`run.c` (its own .bin reader, interleaved RoPE, its own `encode`) on
stories260K. Run it in an environment with torch, transformers and gguf
(not the project's; torch is deliberately not a palu-jax dependency):

  python tests/golden/make_golden.py SMOLLM_GGUF SHARED_DIR [--full]

--full also computes whole-corpus perplexities (minutes on a CPU).
"""

import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMOL_PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived",
]


def smollm2(gguf_path, shared, full):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  folder, name = os.path.split(gguf_path)
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  # transformers' GGUF converter drops llama.cpp's `smollm` pre-tokenizer;
  # restore SmolLM2's published tokenizer.json chain (Digits(individual) ->
  # ByteLevel), otherwise digit runs tokenize differently from the model's
  # training (e.g. 304,986 vs 304,978 tokens on WikiText-2 test).
  from tokenizers import pre_tokenizers
  tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                               use_regex=True)])
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                               dtype=torch.float32).eval()
  out = _existing("smollm2_135m.json")
  out.update({"implementation": f"transformers {__import__('transformers').__version__}"
              f" + torch {torch.__version__} (fp32, CPU), GGUF dequantized by "
              "transformers; SmolLM2's Digits+ByteLevel pre-tokenizer",
              "prompts": []})
  for p in SMOL_PROMPTS:
    ids = tok(p, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
      gen = model.generate(torch.tensor([ids]), max_new_tokens=32,
                           do_sample=False, eos_token_id=None, pad_token_id=2)
      logits = model(torch.tensor([ids])).logits[0, -1]
    out["prompts"].append({
        "text": p, "ids": ids, "greedy_32": gen[0, len(ids):].tolist(),
        "last_logits_top5": torch.topk(logits, 5).indices.tolist(),
        "last_logits_first8": logits[:8].tolist()})
  text = open(os.path.join(shared, "data/wikitext2/test.txt")).read()
  ids = tok(text, add_special_tokens=False)["input_ids"]
  out["wikitext2_num_tokens"] = len(ids)
  out["wikitext2_first_ids"] = ids[:64]
  out["ppl_slice"] = {"seqlen": 256, "windows": 4,
                      **_ppl(model, ids, 256, 4)}
  if full:
    t = time.time()
    out["ppl_full_2048"] = {"seqlen": 2048, **_ppl(model, ids, 2048, None)}
    out["ppl_full_2048"]["seconds"] = time.time() - t
  return out


def _existing(name):
  """Keeps keys of an earlier run (e.g. --full results) when re-running."""
  path = os.path.join(HERE, name)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _ppl(model, ids, seqlen, limit):
  n = len(ids) // seqlen
  n = n if limit is None else min(n, limit)
  total = 0.0
  for i in range(n):
    x = torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])
    with torch.no_grad():
      logits = model(x).logits[0, :-1].double()
    total += torch.nn.functional.cross_entropy(
        logits, x[0, 1:], reduction="sum").item()
    print(f"  window {i + 1}/{n}", file=sys.stderr, flush=True)
  nll = total / (n * (seqlen - 1))
  return {"windows": n, "nll": nll, "perplexity": math.exp(nll)}


# --- stories260K: a PyTorch port of llama2.c run.c -------------------------


class Llama2c(torch.nn.Module):

  def __init__(self, path):
    super().__init__()
    raw = open(path, "rb").read()
    (self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv, vocab,
     self.seq_len) = struct.unpack("<7i", raw[:28])
    self.vocab = abs(vocab)
    w = np.frombuffer(raw, dtype=np.float32, offset=28)
    d, h, L, kvd = self.dim, self.hidden, self.n_layers, \
        self.n_kv * self.dim // self.n_heads
    pos = 0
    def take(*shape):
      nonlocal pos
      n = int(np.prod(shape))
      t = torch.from_numpy(w[pos:pos + n].copy()).reshape(shape)
      pos += n
      return t
    self.emb = take(self.vocab, d)
    self.rms_att, self.wq = take(L, d), take(L, d, d)
    self.wk, self.wv, self.wo = take(L, kvd, d), take(L, kvd, d), take(L, d, d)
    self.rms_ffn = take(L, d)
    self.w1, self.w2, self.w3 = take(L, h, d), take(L, d, h), take(L, h, d)
    self.rms_final = take(d)
    self.head_size = d // self.n_heads

  def forward(self, tokens):
    """tokens [T] -> logits [T, V], a sequence at once (causal)."""
    T = len(tokens)
    hs = self.head_size
    x = self.emb[tokens]
    pos = torch.arange(T, dtype=torch.float32)
    freq = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    ang = pos[:, None] * freq[None]                     # [T, hs/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    def rope(v):  # interleaved pairs (2i, 2i+1), as run.c
      v = v.reshape(T, -1, hs // 2, 2)
      a, b = v[..., 0], v[..., 1]
      return torch.stack([a * cos[:, None] - b * sin[:, None],
                          a * sin[:, None] + b * cos[:, None]], -1).reshape(T, -1, hs)
    def rms(v, g):
      return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * g
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(self.n_layers):
      xb = rms(x, self.rms_att[l])
      q = rope(xb @ self.wq[l].T)
      k = rope(xb @ self.wk[l].T)
      v = (xb @ self.wv[l].T).reshape(T, -1, hs)
      rep = self.n_heads // self.n_kv
      k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
      att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs) + mask
      o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, -1)
      x = x + o @ self.wo[l].T
      xb = rms(x, self.rms_ffn[l])
      x = x + (torch.nn.functional.silu(xb @ self.w1[l].T) * (xb @ self.w3[l].T)) @ self.w2[l].T
    return rms(x, self.rms_final) @ self.emb.T


def llama2c_encode(text, vocab, scores):
  """llama2.c encode(): dummy prefix, chars, then best-score pair merges."""
  lookup = {p: i for i, p in reversed(list(enumerate(vocab)))}
  ids = []
  for ch in " " + text:
    if ch in lookup:
      ids.append(lookup[ch])
    else:
      ids.extend(b + 3 for b in ch.encode("utf-8"))
  while True:
    best, best_id, best_i = -1e10, -1, -1
    for i in range(len(ids) - 1):
      j = lookup.get(vocab[ids[i]] + vocab[ids[i + 1]])
      if j is not None and scores[j] > best:
        best, best_id, best_i = scores[j], j, i
    if best_i < 0:
      return ids
    ids[best_i:best_i + 2] = [best_id]


def stories(shared, full):
  mdir = os.path.join(shared, "models/stories260K")
  model = Llama2c(os.path.join(mdir, "stories260K.bin"))
  raw = open(os.path.join(mdir, "tok512.bin"), "rb").read()
  vocab, scores, pos = [], [], 4
  while pos < len(raw):
    s, n = struct.unpack_from("<fi", raw, pos)
    vocab.append(raw[pos + 8:pos + 8 + n].decode("utf-8", "replace"))
    scores.append(s)
    pos += 8 + n
  text = open(os.path.join(shared, "data/tinystories/valid.txt")).read()
  head = text[:4000]
  head_ids = llama2c_encode(head, vocab, scores)
  out = {"implementation": "PyTorch port of llama2.c run.c (fp32, CPU) with "
         "llama2.c's encode()", "text_head_chars": 4000,
         "text_head_ids": head_ids}
  with torch.no_grad():
    logits = model(torch.tensor([1] + head_ids[:255]))
  out["logits_bos_prefix_255_last8"] = logits[-1, :8].tolist()
  def ppl(ids, seqlen, limit=None):
    n = len(ids) // seqlen if limit is None else min(limit, len(ids) // seqlen)
    total = 0.0
    for i in range(n):
      x = torch.tensor(ids[i * seqlen:(i + 1) * seqlen])
      with torch.no_grad():
        lg = model(x)[:-1].double()
      total += torch.nn.functional.cross_entropy(lg, x[1:], reduction="sum").item()
    nll = total / (n * (seqlen - 1))
    return {"seqlen": seqlen, "windows": n, "nll": nll,
            "perplexity": math.exp(nll)}
  out["ppl_head_seqlen128"] = ppl(head_ids, 128)
  if full:
    # Tokenizing 794 KB with the quadratic encode() is slow: go paragraph-wise
    # (merges never cross the space before a word, so this is the same).
    ids = _encode_words(text, vocab, scores)
    out["tinystories_num_tokens"] = len(ids)
    out["ppl_full_512"] = ppl(ids, 512)
  return out


def _encode_words(text, vocab, scores):
  """encode(text) word by word: each piece is ' word' (dummy prefix first)."""
  words, start, t = [], 0, " " + text
  for k in range(1, len(t) + 1):
    if k == len(t) or (t[k] == " " and t[k - 1] != " "):
      words.append(t[start:k])
      start = k
  memo, ids = {}, []
  for w in words:
    assert w.startswith(" ")
    if w not in memo:
      memo[w] = llama2c_encode(w[1:], vocab, scores)  # re-adds the space
    ids.extend(memo[w])
  return ids


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("gguf")
  ap.add_argument("shared")
  ap.add_argument("--full", action="store_true")
  ap.add_argument("--only", choices=["smollm2", "stories"], default=None)
  a = ap.parse_args()
  torch.manual_seed(0)
  if a.only in (None, "stories"):
    res = stories(a.shared, a.full)
    with open(os.path.join(HERE, "stories260k.json"), "w") as f:
      json.dump(res, f, indent=1)
  if a.only in (None, "smollm2"):
    res = smollm2(a.gguf, a.shared, a.full)
    with open(os.path.join(HERE, "smollm2_135m.json"), "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
