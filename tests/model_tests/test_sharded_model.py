"""Sharded vs single-device models on 8 host devices (issue 19).

`sharded_check.py` runs in a fresh process with
`--xla_force_host_platform_device_count=8` (the device count is fixed when
jax starts) and compares, on meshes 8x1, 1x8, 2x4 and 4x2, the forward
logits of a dense model and of Palu models with 16-bit and int4 latent
caches (float32), and greedy generation on a ragged batch of 8 prompts.
"""

import json
import os
import subprocess
import sys

import pytest

from palu_jax.sharding import mesh as M

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "model_tests",
                                    "sharded_check.py")],
      env=env, check=True, capture_output=True, text=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


MESHES = ("data=8", "model=8", "data=2,model=4", "data=4,model=2")


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", ["dense", "palu16", "palu_int4", "palu_fp8"])
def test_sharded_logits_equal_one_device(results, model, mesh):
  r = results[f"{model}|{mesh}"]
  # f32; sharded contractions sum in another order
  assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["max_abs"]), r


@pytest.mark.parametrize("model", ["dense", "palu16", "palu_int4", "palu_fp8"])
def test_data_parallel_perplexity_equals_one_device(results, model):
  one, many = results[f"{model}|ppl"]
  # float32 sums in another order; with int4 latents an ulp can also move
  # a value across a rounding boundary (seen: 2e-6 relative)
  assert many == pytest.approx(one, rel=1e-5)


@pytest.mark.parametrize("model", ["dense", "palu16", "palu_int4", "palu_fp8"])
def test_data_parallel_zero_shot_scores_equal_one_device(results, model):
  r = results[f"{model}|zeroshot"]
  assert r["max_abs_diff"] < 1e-4 and r["same_greedy"]


def test_greedy_generation_identical(results):
  runs = [r for r in results.values()
          if isinstance(r, dict) and "same_tokens" in r]
  assert len(runs) == results["greedy_runs"] == 4
  assert all(r["same_tokens"] for r in runs)


def test_decode_kernel_path_per_device_identical(results):
  """The latent decode kernels' path (its jnp backend on CPU) under
  shard_map, one call per device over its groups and rows."""
  runs = [r for r in results.values()
          if isinstance(r, dict) and "same_tokens_kernel_path" in r]
  assert len(runs) == results["kernel_greedy_runs"] == 4
  assert all(r["same_tokens_kernel_path"] for r in runs)


def test_parameters_and_caches_are_really_sharded(results):
  assert results["devices"] == 8
  # q_proj [64, 8 heads x 16] column-sharded over "model"
  sizes = {"data=8": 1, "model=8": 8, "data=2,model=4": 4,
           "data=4,model=2": 2}
  for mesh, m in sizes.items():
    r = results[f"palu16|{mesh}"]
    assert r["q_shard_shape"] == [64, 128 // m]
    assert r["q_spec"] == ([None, None] if m == 1 else [None, "model"])
  # latent caches: batch over data, the latent width over model
  assert results["palu16|data=2,model=4"]["cache_specs"] == {
      "hk": ["data", None, "model"], "hv": ["data", None, "model"]}
  # dense cache with 4 KV heads: sharded over model=4, replicated over 8
  assert results["dense|data=2,model=4"]["cache_specs"]["k"] == [
      "data", None, "model", None]
  assert results["dense|model=8"]["cache_specs"]["k"] == [None] * 4
  # int4 codes (4 groups of 8 latents: 4 bytes each) and their scales and
  # offsets split like 16-bit latents; float8 codes too, with no offsets
  for name in ("k_codes", "k_scale", "k_offset", "v_codes", "v_scale"):
    assert results["palu_int4|data=2,model=4"]["cache_specs"][name] == [
        "data", None, "model"], name
  fp8 = results["palu_fp8|data=4,model=2"]["cache_specs"]
  assert fp8["k_codes"] == fp8["k_scale"] == ["data", None, "model"]
  assert fp8["k_offset"] == ["data", None, None]     # width 0


def test_data_parallel_calibration_equals_one_device(results):
  r = results["calibration"]
  assert r["tokens"] == [8 * 24, 8 * 24]
  assert r["gram_rel_diff"] < 1e-5
  assert r["fisher_keys_equal"] and r["fisher_modules"] == 2 * 2
  assert r["fisher_rel_diff"] < 1e-4


def test_group_svds_spread_over_devices_equal_one_device(results):
  r = results["svd"]
  assert r["matrices"] == 8 and r["devices"] == 8
  assert r["rel_diff"] < 1e-4


def test_lora_steps_equal_one_device(results):
  r = results["lora"]
  one, many = r["losses"]
  assert many == pytest.approx(one, rel=1e-5)
  # Adam divides by √v: gradient entries near its eps turn float-order
  # differences of the sharded sums into update differences (seen 1.8e-4
  # of the largest adapter entry after two steps)
  assert r["adapters"] > 0 and r["adapter_rel_diff"] < 1e-3


def test_orbax_round_trip_onto_another_mesh(results):
  r = results["orbax"]
  assert r["saved_k_down_spec"] == [None, "model"]        # 2x4 on save
  # k_down [64, 4 groups x 8]: over model=8 -> 4 columns per device
  assert r["model=8"]["k_down_spec"] == [None, "model"]
  assert r["model=8"]["k_down_shard"] == [64, 4]
  assert r["data=8"]["k_down_spec"] == [None, None]       # replicated
  for spec in ("model=8", "data=8"):
    assert r[spec]["same_keys"] and r[spec]["max_abs_diff"] == 0.0
  # host arrays into shards: q_proj [64, 128] over model=8
  assert r["from_params"]["max_abs_diff"] == 0.0
  assert r["from_params"]["q_shard"] == [64, 16]


def test_logical_axes_are_on_every_weight():
  """Every parameter of dense and Palu models names its logical axes, each
  a known rule."""
  import jax.numpy as jnp
  from flax import nnx
  from palu_jax.config import ModelConfig, PaluConfig
  from palu_jax.model import Transformer
  cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4,
                    n_kv_heads=2, head_dim=8, hidden_dim=64, qkv_bias=True)
  ranks = ((8, 8),)
  for palu in (None, PaluConfig(group_size=1, k_ranks=ranks, v_ranks=ranks)):
    model = nnx.eval_shape(lambda: Transformer(
        cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), palu=palu))
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
      axes = var.get_metadata().get("logical_axes")
      assert axes is not None, path
      assert len(axes) == len(var.get_value().shape), path
      assert all(a is None or a in M.RULES for a in axes), (path, axes)


def test_bench_sharded_writes_rows_for_each_mesh(tmp_path):
  """eval/bench_sharded.py on the tiny shape and 8 host devices (the
  numbers mean nothing on a CPU; the rows, fields and files are checked):
  decode on three meshes, weights and caches made in their shards, then
  calibration + decomposition on two data-parallel meshes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run(
      [sys.executable, "-m", "eval.bench_sharded", "--model", "tiny",
       "--variants", "base", "palu50_int4", "--scale-per-token",
       "--batches", "8",
       "--contexts", "128", "--meshes", "none", "data=1,model=1",
       "data=2,model=4", "--steps", "8", "--repeats", "1",
       "--out", str(tmp_path)],
      env=env, check=True, capture_output=True, text=True, cwd=ROOT)
  data = json.loads((tmp_path / "bench_sharded_cpux8.json").read_text())
  assert data["n_devices"] == 8 and data["task"] == "decode"
  for variant in ("base", "palu50_int4"):
    rows = [r for r in data["rows"] if r["variant"] == variant]
    assert [(r["mesh"], r["devices"]) for r in rows] == [
        ("none", 1), ("data=1,model=1", 1), ("data=2,model=4", 8)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["vs_unsharded"] == 1.0
    assert rows[1]["scaling_efficiency"] == 1.0
    assert rows[2]["scaling_base"] == 1
    # 2x4: each device holds a part of the weights and of the cache (int4
    # codes too: split by latent group)
    for key in ("weight_bytes_per_device", "cache_bytes_per_device"):
      assert rows[2][key] < rows[1][key], key
  for ext in ("md", "png"):
    assert (tmp_path / f"bench_sharded_cpux8.{ext}").exists()

  subprocess.run(
      [sys.executable, "-m", "eval.bench_sharded", "--task", "compress",
       "--model", "tiny", "--meshes", "data=1", "data=4",
       "--calib-windows", "8", "--calib-seqlen", "32", "--out",
       str(tmp_path)],
      env=env, check=True, capture_output=True, text=True, cwd=ROOT)
  rows = json.loads((tmp_path / "bench_sharded_compress_cpux8.json"
                     ).read_text())["rows"]
  assert [(r["mesh"], r["batch_size"]) for r in rows] == [("data=1", 1),
                                                          ("data=4", 4)]
  for r in rows:
    assert r["cold_total_s"] > 0 and r["total_s"] == pytest.approx(
        r["grams_s"] + r["fisher_s"] + r["decompose_s"])
  assert rows[0]["speedup"] == 1.0 and rows[1]["scaling_base"] == 1
