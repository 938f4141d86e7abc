"""Needle in a haystack, synthetic: no data files needed.

A haystack of filler sentences (seeded, drawn from small word lists) hides
one sentence "The secret code of <name> is <digits>." at a depth fraction
of the context; the prompt ends by asking for it, and the sample counts as
retrieved when the digits are the model's greedy continuation (every
answer token is the argmax, scored in one forward pass, which equals greedy
decoding of the answer).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eval.zeroshot.scoring import score_token_pairs
from palu_jax.errors import ConfigError

_SUBJECTS = ("the farmer", "a small dog", "the old captain", "my neighbour",
             "the river", "a quiet student", "the baker", "the train",
             "a tall tree", "the teacher", "the wind", "a young painter")
_VERBS = ("walked past", "looked at", "talked about", "waited near",
          "thought about", "carried", "followed", "painted", "cleaned",
          "remembered", "found", "watched")
_OBJECTS = ("the red barn", "a wooden bridge", "the morning market",
            "an empty field", "the stone wall", "a bowl of soup",
            "the harbour lights", "a stack of letters", "the village clock",
            "a green umbrella", "the long road", "a basket of apples")
_TAILS = ("before noon", "in the rain", "after dinner", "without a word",
          "for a while", "on Sunday", "at dawn", "once again")
_NAMES = ("Brightwater", "Kestrel Point", "Marlow", "Ashford", "Pinecrest",
          "Redcliff", "Eastbrook", "Silverton", "Oakhaven", "Willowmere")


@dataclasses.dataclass(frozen=True)
class NeedleSample:
  context_len: int     # target prompt length in tokens
  depth: float         # where the needle sits, 0 = start, 1 = end
  prompt: list[int]
  answer: list[int]


def _sentence(rng) -> str:
  pick = lambda xs: xs[rng.integers(len(xs))]
  text = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}."
  return " " + text[0].upper() + text[1:]


def make_sample(tokenizer, context_len: int, depth: float, seed: int
                ) -> NeedleSample:
  """One prompt of about `context_len` tokens with the needle at `depth`."""
  if not 0.0 <= depth <= 1.0:
    raise ConfigError("depth", f"must be in [0, 1], got {depth}")
  rng = np.random.default_rng(seed)
  name = _NAMES[rng.integers(len(_NAMES))]
  code = "".join(str(d) for d in rng.integers(0, 10, 6))
  needle = f" The secret code of {name} is {code}."
  question = (f"\n\nQuestion: What is the secret code of {name}?\n"
              f"Answer: The secret code of {name} is")
  answer = tokenizer.encode(f" {code}", add_bos=False)
  fixed = len(tokenizer.encode(needle + question, add_bos=False))
  budget = context_len - fixed - len(answer)
  if budget <= 0:
    raise ConfigError("context_len", f"{context_len} tokens cannot hold the "
                      f"needle and question ({fixed} tokens)")
  sentences, used = [], 0
  while True:
    s = _sentence(rng)
    n = len(tokenizer.encode(s, add_bos=False))
    if used + n > budget:
      break
    sentences.append(s)
    used += n
  cut = round(depth * len(sentences))
  text = "".join(sentences[:cut]) + needle + "".join(sentences[cut:])
  prompt = tokenizer.encode(text.lstrip() + question, add_bos=False)
  return NeedleSample(context_len, depth, prompt, answer)


def needle_eval(model, tokenizer, *, context_lens=(2048, 4096, 8192, 16384,
                                                     32768),
                depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 2,
                max_batch_tokens: int = 65536, progress: bool = True
                ) -> dict:
  """Retrieval accuracy per context length (lengths past the model's
  max_seq_len are reported as skipped)."""
  by_len, skipped = {}, []
  pairs, keys = [], []
  for n in context_lens:
    if n > model.cfg.max_seq_len:
      skipped.append(n)
      continue
    for d in depths:
      for k in range(samples):
        s = make_sample(tokenizer, n, d, seed=n * 1000 + round(d * 100) * 10 + k)
        pairs.append((s.prompt, s.answer))
        keys.append((n, d))
  scores = score_token_pairs(model, pairs, batch_size=8,
                             max_batch_tokens=max_batch_tokens,
                             progress=progress, desc="needle")
  for (n, d), sc in zip(keys, scores):
    row = by_len.setdefault(n, {"hits": 0, "n": 0, "by_depth": {}})
    row["hits"] += sc.is_greedy
    row["n"] += 1
    cell = row["by_depth"].setdefault(str(d), [0, 0])
    cell[0] += sc.is_greedy
    cell[1] += 1
  per_len = {str(n): {"accuracy": r["hits"] / r["n"], "n": r["n"],
                      "by_depth": {d: h / c for d, (h, c) in
                                   r["by_depth"].items()}}
             for n, r in sorted(by_len.items())}
  hits = sum(r["hits"] for r in by_len.values())
  total = sum(r["n"] for r in by_len.values())
  return {"accuracy": hits / total if total else None, "n": total,
          "per_length": per_len, "skipped_lengths": skipped,
          "max_seq_len": model.cfg.max_seq_len}
