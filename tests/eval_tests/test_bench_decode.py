"""The decode benchmark script runs end to end (tiny shape, CPU) and writes
its JSON and markdown; timings are not asserted (tests are not timed)."""

import json

from eval import bench_decode


def test_bench_decode_writes_results(tmp_path):
  assert bench_decode.main([
      "--models", "tiny", "--contexts", "32", "--batches", "1", "2",
      "--steps", "8", "--repeats", "1", "--bandwidth-gib", "0.01",
      "--out", str(tmp_path)]) == 0
  payload = json.loads((tmp_path / "bench_decode.json").read_text())
  rows = payload["rows"]
  assert [(r["batch"], r["context"]) for r in rows] == [(1, 32), (2, 32)]
  for r in rows:
    assert r["tokens_per_s"] > 0 and 0 < r["frac_of_weight_kv_bound"]
    assert r["weight_kv_read_ms"] > r["weight_read_ms"]
  assert "| tiny | 2 | 32 |" in (tmp_path / "bench_decode.md").read_text()


def test_pseudo_random_fill_is_not_zero():
  import jax.numpy as jnp
  x = bench_decode._pseudo_random(jnp.float32(3), shape=(64, 64),
                                  dtype=jnp.bfloat16)
  assert x.shape == (64, 64) and x.dtype == jnp.bfloat16
  assert float(jnp.std(x.astype(jnp.float32))) > 0.01
