"""eval/bench_sharded.py's sizing: what one device of a mesh holds of a
model and its cache, from shapes alone (the multi-GPU run skips what does
not fit and reports the longest context at batch 1 from it)."""

import pytest
from jax.sharding import AbstractMesh

from eval.bench_decode import SHAPES, fill_sharded, _fill
from eval.bench_sharded import default_name
from eval.sharded_sizes import footprint, longest_context

# Llama-2-70B's parameters counted by hand from its shape (independent of
# the model code): embeddings and LM head 2 x 32000 x 8192; per layer q and
# o 8192 x 8192, k and v 8192 x 1024, the MLP 3 x 8192 x 28672 and two norms
# of 8192; a final norm.
NORMS = (2 * 80 + 1) * 8192
PARAMS_70B = (2 * 32000 * 8192 + 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024
                                       + 3 * 8192 * 28672) + NORMS)


def test_70b_weights_split_eight_ways():
  cfg = SHAPES["llama2-70b"]
  assert PARAMS_70B == 68_976_648_192
  one, cache_one = footprint(cfg, None, None)
  assert one == 2 * PARAMS_70B                      # bf16
  eight, cache_eight = footprint(cfg, None, AbstractMesh((1, 8),
                                                         ("data", "model")))
  # all but the norms over model=8 (the norms are replicated)
  assert eight == (2 * PARAMS_70B - 2 * NORMS) // 8 + 2 * NORMS
  # dense cache: 80 layers x k, v x 8 KV heads x 128 x bf16 a row, the 8
  # heads over model=8; plus the int32 lengths, replicated
  row = 80 * 2 * 8 * 128 * 2
  assert cache_one(16, 1024) == 16 * 1024 * row + 16 * 4
  assert cache_eight(16, 1024) == 16 * 1024 * row // 8 + 16 * 4


def test_longest_context_at_batch_1():
  cfg = SHAPES["llama2-70b"]
  weights, cache = footprint(cfg, None, AbstractMesh((1, 8),
                                                     ("data", "model")))
  limit = 140 * 2**30
  got = longest_context(limit, weights, cache, 1)
  per_row = 80 * 2 * 8 * 128 * 2 // 8
  assert got == int((0.92 * limit - weights - 4) / per_row)
  # weights that do not fit leave no room
  assert longest_context(weights // 2, weights, cache, 1) == 0


def test_sharded_fill_equals_one_device_fill():
  """`fill_sharded` computes each weight in its shards; the values equal
  the single-device `_fill` (one device here: the values, not the
  placement, are what this checks; tests/model_tests covers 8)."""
  import jax
  import numpy as np
  from flax import nnx
  from palu_jax.model import Transformer
  from palu_jax.sharding.mesh import make_mesh
  cfg = SHAPES["tiny"]
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  a = jax.tree_util.tree_leaves(_fill(state, 3))
  b = jax.tree_util.tree_leaves(fill_sharded(state, make_mesh("data=1"), 3))
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x, np.float32).std() > 0.01      # never all zeros


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


@pytest.mark.parametrize("kind,task,want", [
    ("NVIDIA H200", "decode", "bench_sharded_h200x8"),
    ("NVIDIA H200", "compress", "bench_sharded_compress_h200x8"),
    ("cpu", "decode", "bench_sharded_cpux8"),
])
def test_default_names(kind, task, want):
  assert default_name(task, [_Device(kind)] * 8) == want


def test_plan_task_sizes_meshes_without_devices(tmp_path):
  """`--task plan` on a CPU: the 70B shape at batch 16 and 64K on 2, 4 and
  8 devices of 139 GiB, dense and Palu 50 % per head. By hand: the dense
  cache is 16 x (65536 + 32 steps + 8, the decode loop's chunk) rows x
  327,680 B = 320.2 GiB (+ the weights' 128.5), so 2 devices cannot hold
  it and 4 can."""
  import json
  from eval.bench_sharded import main
  assert main(["--task", "plan", "--model", "llama2-70b", "--variants",
               "base", "palu50_g1", "palu50_int4_g1", "--scale-per-token",
               "--meshes", "model=2", "model=4", "model=8", "--batches",
               "16", "--contexts", "65536", "--memory-gib", "139",
               "--out", str(tmp_path), "--name", "plan"]) == 0
  rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
  fits = {(r["variant"], r["devices"]): r["fits"] for r in rows}
  assert fits == {("base", 2): False, ("base", 4): True, ("base", 8): True,
                  ("palu50_g1", 2): False, ("palu50_g1", 4): True,
                  ("palu50_g1", 8): True, ("palu50_int4_g1", 2): True,
                  ("palu50_int4_g1", 4): True, ("palu50_int4_g1", 8): True}
  dense2 = next(r for r in rows if r["variant"] == "base"
                and r["devices"] == 2)
  rows_cached = 16 * (65536 + 32 + 8)
  assert dense2["cache_gib_per_device"] == pytest.approx(
      (rows_cached * 327_680 / 2 + 16 * 4) / 2**30)
  # int4 codes split over the 8 per-head groups: a quarter of the bf16
  # latents' bytes (plus scales and offsets), on every mesh
  for n in (2, 4, 8):
    bf16, int4 = (next(r for r in rows if r["variant"] == v
                       and r["devices"] == n)["cache_gib_per_device"]
                  for v in ("palu50_g1", "palu50_int4_g1"))
    assert 0.25 < int4 / bf16 < 0.3
  assert (tmp_path / "plan.md").exists()
