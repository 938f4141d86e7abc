"""One process of a two-process job (test_multiprocess.py starts two):
perplexity, greedy generation and zero-shot scoring of the Palu model of
sharded_check.py on
a data=4 mesh that spans both processes' 2 CPU devices each. Prints
JSON."""

import json
import sys

import numpy as np

from palu_jax.sharding.distributed import initialize

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8], [3], [6, 2, 9, 9]]   # ragged
# zero-shot requests: (context, continuation) ids, ragged contexts
PAIRS = [([4, 8, 15, 16], [23, 42]), ([7] * 9, [1, 2, 3]), ([2, 5], [9]),
         ([11, 3, 3, 7, 1, 9], [6, 6]), ([8], [4, 4, 4]),
         ([1, 2, 3, 4, 5, 6, 7], [8])]


def main():
  port, pid = sys.argv[1], int(sys.argv[2])
  assert initialize(f"localhost:{port}", num_processes=2, process_id=pid)
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from eval.perplexity import perplexity
  from palu_jax.model import Transformer
  from palu_jax.sharding.mesh import make_mesh
  from sharded_check import CFG, MODELS
  model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(1),
                      palu=MODELS["palu16"])
  ids = np.random.default_rng(5).integers(0, 256, 12 * 32)
  r = perplexity(model, ids, seqlen=32, batch_size=4, progress=False,
                 mesh=make_mesh("data=4"))
  from palu_jax.generate import Generator
  tokens = Generator(model, mesh=make_mesh("data=4")).generate_ids(
      PROMPTS, max_new_tokens=6)
  from eval.zeroshot.scoring import score_token_pairs
  scores = score_token_pairs(model, PAIRS, batch_size=4, progress=False,
                             mesh=make_mesh("data=4"))
  print(json.dumps({"process": jax.process_index(), "tokens": tokens,
                    "logprobs": [s.logprob for s in scores],
                    "greedy": [s.is_greedy for s in scores],
                    "processes": jax.process_count(),
                    "devices": len(jax.devices()), "nll": r.nll,
                    "windows": r.windows}))


if __name__ == "__main__":
  main()
