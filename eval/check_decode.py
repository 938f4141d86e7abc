"""Greedy decoding of a compressed model with the kernels and without.

  python -m eval.check_decode COMPRESSED_DIR [--tokens 64] [--dtype float32]

Loads the model (bf16 by default; the CPU has no bf16 dot with f32 results,
so use float16 or float32 there, where the kernels run in interpret mode),
generates greedily from a few prompts twice, once with
`implementation="pallas"` (the Pallas decode kernels) and once with
`"xla"` (the jnp attention), and reports whether every token is the same,
the time per run, and the first divergence if any. Exit code 1 on a
mismatch. In float32 both paths compute exact products with f32 sums, so
any difference is a bug; in 16-bit they round at different points and a
near-tie can flip after some tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from palu_jax.api import load_model
from palu_jax.generate import Generator

PROMPTS = ["The history of the Roman Empire",
           "def fibonacci(n):",
           "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]


def prefill_agreement(model, prompts) -> dict:
  """Prompt logits with the default prefill attention (cuDNN on a GPU)
  against the jnp path: max |difference| relative to max |logit|, and the
  fraction of positions whose argmax agrees."""
  batch, width = len(prompts), max(map(len, prompts))
  ids = np.zeros((batch, width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  logits = {}
  for impl in ("jnp", None):
    model.set_attention_implementation(None, prefill=impl)
    out, _ = model(jnp.asarray(ids), model.init_cache(batch, width),
                   num_valid=lengths, fresh_cache=True)
    logits[impl] = np.asarray(out, np.float32)
  model.set_attention_implementation(None)
  valid = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
  ref, got = logits["jnp"][valid], logits[None][valid]
  return {"max_rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
          "argmax_agree": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("model")
  ap.add_argument("--tokens", type=int, default=64)
  ap.add_argument("--dtype", default="bfloat16",
                  choices=("bfloat16", "float16", "float32"))
  args = ap.parse_args(argv)
  if args.dtype == "float32":
    # exact f32 dots in the jnp path too (XLA's default on a GPU is TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
  model, tok = load_model(args.model, dtype=args.dtype)
  prompts = [tok.encode(p) for p in PROMPTS]
  outs, secs = {}, {}
  for impl in ("xla", "pallas"):
    model.set_attention_implementation(impl)
    gen = Generator(model)
    gen.generate_ids(prompts, max_new_tokens=4)              # compile
    t = time.perf_counter()
    outs[impl] = gen.generate_ids(prompts, max_new_tokens=args.tokens)
    secs[impl] = time.perf_counter() - t
  same = outs["xla"] == outs["pallas"]
  report = {"identical": same, "dtype": args.dtype, "seconds": secs,
            "tokens": args.tokens, "prompts": len(prompts),
            "prefill": prefill_agreement(model, prompts)}
  if not same:
    for i, (a, b) in enumerate(zip(outs["xla"], outs["pallas"])):
      k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
      if k is not None:
        report.setdefault("first_divergence", []).append(
            {"prompt": i, "token": k})
  print(json.dumps(report))
  print("xla:   ", repr(tok.decode(outs["xla"][0])))
  print("pallas:", repr(tok.decode(outs["pallas"][0])))
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
