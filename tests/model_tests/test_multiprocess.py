"""Two processes joined by jax.distributed (loopback coordinator, gloo CPU
collectives) compute the perplexity one process computes (issue 19)."""

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval.perplexity import perplexity
from palu_jax.errors import ConfigError
from palu_jax.model import Transformer
from palu_jax.sharding.distributed import initialize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_compute_what_one_process_computes():
  """Perplexity, greedy tokens of a ragged batch and zero-shot scores of
  ragged requests (rows split over the processes, gathered back to
  each)."""
  sys.path.insert(0, HERE)
  from sharded_check import CFG, MODELS
  model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(1),
                      palu=MODELS["palu16"])
  ids = np.random.default_rng(5).integers(0, 256, 12 * 32)
  want = perplexity(model, ids, seqlen=32, batch_size=4, progress=False)
  from multiprocess_check import PROMPTS
  from palu_jax.generate import Generator
  want_tokens = Generator(model).generate_ids(PROMPTS, max_new_tokens=6)
  from eval.zeroshot.scoring import score_token_pairs
  from multiprocess_check import PAIRS
  want_scores = score_token_pairs(model, PAIRS, batch_size=4, progress=False)
  port = str(_free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, HERE]),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  script = os.path.join(HERE, "multiprocess_check.py")
  procs = [subprocess.Popen([sys.executable, script, port, str(i)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(o["process"] for o in outs) == [0, 1]
  for o in outs:
    assert o["processes"] == 2 and o["devices"] == 4
    assert o["windows"] == want.windows == 12
    assert o["nll"] == pytest.approx(want.nll, rel=1e-5)
    assert o["tokens"] == want_tokens
    assert o["logprobs"] == pytest.approx([s.logprob for s in want_scores],
                                          rel=1e-5, abs=1e-5)
    assert o["greedy"] == [s.is_greedy for s in want_scores]


def test_initialize_without_a_job_is_a_no_op_and_bad_flags_are_named(
    monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
            "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(k, raising=False)
  assert initialize() is False
  with pytest.raises(ConfigError, match="need a coordinator"):
    initialize(num_processes=2, process_id=1)
  with pytest.raises(ConfigError, match="not host:port"):
    initialize("localhost", num_processes=2, process_id=0)
  with pytest.raises(ConfigError, match="needs --num-processes"):
    initialize("localhost:1234")
  with pytest.raises(ConfigError, match="not in 0..1"):
    initialize("localhost:1234", num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES: must be an "
                     "integer"):
    initialize("localhost:1234")
