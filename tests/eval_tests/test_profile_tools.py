"""The trace arithmetic of eval/profile_kernel.py and eval/profile_decode.py
on hand-made traces (the GPU runs produce the real ones)."""

import dataclasses

import jax.numpy as jnp
import pytest

from eval.profile_decode import kernel_kind, summarize
from eval.profile_kernel import stage_cycles
from eval.trace_events import busy_us, gpu_kernel_events, span_us


def _range(name, begin, end, tid):
  # the profiler's timestamps: SM cycles / 1e3
  return [{"name": name, "ph": "B", "ts": begin / 1e3, "tid": tid},
          {"name": name, "ph": "E", "ts": end / 1e3, "tid": tid}]


def test_stage_cycles_per_role_and_period():
  events = []
  for t in range(4):                      # a compute WG: tiles every 1000
    base = 1000 * t
    events += _range("k_wait", base, base + 100, tid=1)
    events += _range("rebuild", base + 100, base + 400, tid=1)
  events += _range("k_free", 0, 50, tid=3)  # the producer
  events += _range("k_free", 60, 90, tid=3)
  out = stage_cycles({"traceEvents": events})
  assert out["compute"]["k_wait"] == pytest.approx([100] * 4)
  assert out["compute"]["rebuild"] == pytest.approx([300] * 4)
  # the first gap is dropped (pipeline fill): starts 0,1000,2000,3000
  assert out["compute"]["period"] == pytest.approx([1000, 1000])
  assert out["memory"]["k_free"] == pytest.approx([50, 30])
  assert "k_free" not in out["compute"]
  assert not out["converter"]


def test_stage_cycles_names_the_converter_warpgroup():
  """int4_converter's fourth warpgroup (stages c_free, c_wait, c_convert)
  is its own role, not counted as the producer."""
  events = _range("k_wait", 0, 100, tid=1)
  events += _range("k_free", 0, 50, tid=3)
  for t in range(3):
    events += _range("c_wait", 500 * t, 500 * t + 20, tid=4)
    events += _range("c_convert", 500 * t + 20, 500 * t + 420, tid=4)
  out = stage_cycles({"traceEvents": events})
  assert out["converter"]["c_convert"] == pytest.approx([400] * 3)
  assert out["converter"]["c_wait"] == pytest.approx([20] * 3)
  assert "c_convert" not in out["memory"]
  assert out["memory"]["k_free"] == pytest.approx([50])


def test_kernel_kinds():
  assert kernel_kind("palu_latent_rope_mosaic_gpu_kernel") == "latent_attn"
  assert kernel_kind("cudnn_generated_fort_native_sdpa_sm80") == \
      "cudnn_attn"
  assert kernel_kind("gemm_fusion_dot_936") == "matmul"
  assert kernel_kind("input_reduce_fusion_98") == "other"


def _trace():
  meta = [{"ph": "M", "name": "process_name", "pid": 1,
           "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
           "args": {"name": "Stream #13(Compute)"}},
          {"ph": "M", "name": "process_name", "pid": 2,
           "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9,
           "args": {"name": "python"}}]
  kernels = [{"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion_dot_1",
              "ts": 0, "dur": 10},
             {"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion_dot_1",
              "ts": 5, "dur": 10},             # overlaps the first
             {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion",
              "ts": 30, "dur": 5}]
  host = [{"ph": "X", "pid": 2, "tid": 9, "name": "PjitFunction",
           "ts": 0, "dur": 100}]
  return {"traceEvents": meta + kernels + host}


def test_gpu_events_busy_time_and_summary():
  events = gpu_kernel_events(_trace())
  assert len(events) == 3                     # the host event is left out
  assert busy_us(events) == pytest.approx(20.0)   # [0,15) ∪ [30,35)
  assert span_us(events) == pytest.approx(35.0)   # first start to last end
  s = summarize(events, steps=2, wall_s=1e-4)
  assert s["wall_ms_per_step"] == pytest.approx(0.05)
  assert s["gpu_busy_ms_per_step"] == pytest.approx(0.01)
  assert s["kernels_per_step"] == 1.5
  assert s["matmul_ms_per_step"] == pytest.approx(0.01)
  assert s["other_ms_per_step"] == pytest.approx(0.0025)
  assert s["top"][0]["name"] == "gemm_fusion_dot_1"
  # the "other" kernels alone, largest first (the glue around the kernels)
  assert [t["name"] for t in s["top_other"]] == [
      e["name"] for e in events if kernel_kind(e["name"]) == "other"]


def test_e2e_plot_when_no_row_fits(tmp_path):
  """A bench_e2e run whose rows all did not fit (B8 at 64K of the 7B shape
  on one H200) still gets its JSON, table and an empty plot: the plot used
  to raise and stop the run after its first row."""
  import json
  pytest.importorskip("matplotlib")
  from eval.plots import plot_results
  path = tmp_path / "e2e.json"
  path.write_text(json.dumps({"rows": [
      {"variant": "base", "batch": 8, "context": 65536,
       "note": "does not fit"}]}))
  png = plot_results(str(path))
  assert png is not None and (tmp_path / "e2e.png").stat().st_size > 0


def test_bench_kernels_also_parses_config_fields():
  """`bench_kernels --also FIELD=VALUE`: typed as the MosaicConfig field's
  default; unknown fields and bad booleans are refused by name."""
  import argparse

  from eval.bench_kernels import _config_field
  assert _config_field("fuse_heads=false") == ("fuse_heads", False)
  assert _config_field("private_reductions=True") == (
      "private_reductions", True)
  assert _config_field("splits=4") == ("splits", 4)
  assert _config_field("rope_mode=fold") == ("rope_mode", "fold")
  with pytest.raises(argparse.ArgumentTypeError, match="nope"):
    _config_field("nope=1")
  with pytest.raises(argparse.ArgumentTypeError, match="fuse_heads"):
    _config_field("fuse_heads=maybe")
  with pytest.raises(argparse.ArgumentTypeError, match="splits"):
    _config_field("splits=many")
  # comma-joined: one variant with both fields replaced
  from eval.bench_kernels import _config_fields
  assert _config_fields("int4_converter=true,int4_converters=2") == (
      ("int4_converter", True), ("int4_converters", 2))
  assert _config_fields("splits=4") == (("splits", 4),)
  with pytest.raises(argparse.ArgumentTypeError, match="nope"):
    _config_fields("splits=4,nope=1")


def test_profile_kernel_refuses_scale_per_token_without_4_bits(capsys):
  """`--scale-per-token` sets one int4 scale per token; with 16- or 8-bit
  latents it would only rename the rows, so the command line refuses it,
  naming the flag (argparse exits with status 2)."""
  from eval.profile_kernel import main
  for bits in ("16", "8"):
    with pytest.raises(SystemExit) as exit_info:
      main(["--bits", bits, "--scale-per-token"])
    assert exit_info.value.code == 2
    assert "--scale-per-token is for --bits 4" in capsys.readouterr().err


def test_profile_kernel_asks_for_the_cpu_platform(capsys, monkeypatch):
  """The in-kernel profiler hands its trace to the host through a callback
  that needs JAX's CPU platform (with JAX_PLATFORMS=cuda the fourteenth
  session's profiles died in jax.debug.callback): the command refuses to
  start without it and says which setting to use."""
  from eval import profile_kernel

  def no_cpu(backend=None):
    raise RuntimeError(f"Unknown backend {backend}")
  monkeypatch.setattr(profile_kernel.jax, "devices", no_cpu)
  with pytest.raises(SystemExit) as exit_info:
    profile_kernel.main(["--bits", "16"])
  assert exit_info.value.code == 2
  assert "JAX_PLATFORMS=cuda,cpu" in capsys.readouterr().err


def test_profile_space_is_cut_to_the_shared_memory_left(monkeypatch):
  """The profiler's buffers (16 bytes a range and warpgroup) go next to
  the kernel's ring: at 64K the ranges for every tile of Llama-2 G-LRD-4
  (bf16, B1) would not fit, so only the first tiles are profiled, and the
  kernel with that buffer fits exactly as `unsupported_reason` counts it;
  a short context gets every tile; where not even four tiles fit the
  error names the bytes."""
  from eval.bench_kernels import palu_spec
  from eval.profile_kernel import (COMPUTE_STAGES, MIN_PROFILED_TILES,
                                   profile_space_that_fits)
  from pallas_kernels.latent_attention import mosaic_gpu as mg
  spec = palu_spec(32, 32, 128, 0.5, 16, 4, False)
  cfg = mg.choose_config(spec, batch=1, cache_len=65536, rope=True)
  tiles = 65536 // cfg.block_s // cfg.splits + 1
  space = profile_space_that_fits(spec, True, cfg, tiles)
  assert space < len(COMPUTE_STAGES) * tiles
  profiled = dataclasses.replace(cfg, profile_space=space, profile_dir="x")
  assert mg.smem_bytes(spec, True, profiled) <= mg.SMEM_BYTES
  assert mg.unsupported_reason(spec, jnp.bfloat16, 65536, True,
                               profiled) is None
  over = dataclasses.replace(profiled, profile_space=space + 1)
  assert "the profiler's buffers" in mg.unsupported_reason(
      spec, jnp.bfloat16, 65536, True, over)
  assert profile_space_that_fits(spec, True, cfg, 5) == (
      len(COMPUTE_STAGES) * 5 + 16)
  monkeypatch.setattr(mg, "SMEM_BYTES", mg.smem_bytes(spec, True, cfg) + 64)
  with pytest.raises(ValueError, match="profiler's buffers do not fit"):
    profile_space_that_fits(spec, True, cfg, tiles)
  assert MIN_PROFILED_TILES >= 3       # a period needs three tile starts


def test_profiler_bytes_follow_mosaic_gpu_accounting():
  """profile_smem_bytes against Mosaic GPU's own ProfilerSpec (the
  independent count: Pallas asks it for profile_space·2·2 entries per
  warpgroup trace), for two and three compute WGs and the int4
  converter's extra warpgroup."""
  from jax.experimental.mosaic.gpu import profiler
  from pallas_kernels.common import LatentSpec
  from pallas_kernels.latent_attention import mosaic_gpu as mg
  spec = LatentSpec(groups=2, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256, bits=4, quant_group=256)
  for wgs, rope, conv in ((2, True, False), (3, True, False),
                          (2, False, True)):
    cfg = mg.MosaicConfig(compute_wgs=wgs, stages=wgs, profile_space=300,
                          int4_converter=conv)
    all_wgs = wgs + 1 + mg.converter_wgs(spec, rope, cfg)
    assert all_wgs == wgs + 1 + conv
    want = profiler.ProfilerSpec(300 * 2 * 2).smem_bytes(
        block=(128 * all_wgs,))
    assert mg.profile_smem_bytes(spec, rope, cfg) == want


def test_bench_kernels_config_labels_name_only_options_that_apply():
  """fp8_scores is on by default but acts only on float8 keys without
  RoPE; fused heads only with several RoPE heads per CTA: the row labels
  say what ran, not what the config carries."""
  from eval.bench_kernels import _cfg_str
  from pallas_kernels.common import LatentSpec
  from pallas_kernels.latent_attention.mosaic_gpu import MosaicConfig
  bf16 = LatentSpec(groups=8, kv_per_group=1, q_per_kv=1, head_dim=128,
                    k_rank=64, v_rank=64)
  fp8 = LatentSpec(groups=8, kv_per_group=1, q_per_kv=1, head_dim=128,
                   k_rank=64, v_rank=64, bits=8, quant_group=64)
  c = MosaicConfig(block_s=128, stages=4, splits=2)
  assert _cfg_str(c, bf16, False) == "bs=128 P=2 stages=4"
  assert _cfg_str(c, fp8, True) == "bs=128 P=2 stages=4"
  assert _cfg_str(c, fp8, False) == "bs=128 P=2 stages=4 fp8_scores"
  # the options an A/B forces on (or v31's default off) are named too, only
  # where they act: rebuild_early on the RoPE rebuild path, the per-tile
  # float8 value mask on float8 caches
  early = dataclasses.replace(c, rebuild_early=True)
  assert _cfg_str(early, bf16, True) == "bs=128 P=2 stages=4 rebuild_early"
  assert _cfg_str(early, bf16, False) == "bs=128 P=2 stages=4"
  per_tile = dataclasses.replace(c, fp8_mask_last=False)
  assert _cfg_str(per_tile, fp8, True) == (
      "bs=128 P=2 stages=4 fp8_values_masked_per_tile")
  assert _cfg_str(per_tile, bf16, True) == "bs=128 P=2 stages=4"
  # the float8 value windows (v35) only on float8 caches
  halves = dataclasses.replace(c, value_halves=True)
  assert _cfg_str(halves, fp8, True) == "bs=128 P=2 stages=4 value_halves"
  assert _cfg_str(halves, bf16, True) == "bs=128 P=2 stages=4"
  shared = LatentSpec(groups=1, kv_per_group=3, q_per_kv=3, head_dim=64,
                      k_rank=192, v_rank=192, shared=True)
  heads = MosaicConfig(block_s=64, stages=4, splits=8, kv_heads_per_cta=3)
  assert _cfg_str(heads, shared, True).endswith("heads=3")
  assert _cfg_str(MosaicConfig(block_s=64, stages=4, splits=8,
                               kv_heads_per_cta=3, fuse_heads=True),
                  shared, True).endswith("heads=3 fused")
  # int4: the step path (int4_fused off) and, with RoPE only, the keys
  # held in registers are named; the defaults are not
  int4 = LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128,
                    k_rank=256, v_rank=256, bits=4, quant_group=32)
  assert _cfg_str(c, int4, True) == "bs=128 P=2 stages=4"
  steps = MosaicConfig(block_s=64, stages=4, splits=1, int4_fused=False,
                       int4_keys_smem=False)
  assert _cfg_str(steps, int4, False) == "bs=64 P=1 stages=4 int4_steps"
  assert _cfg_str(steps, int4, True) == (
      "bs=64 P=1 stages=4 int4_steps keys_in_registers")
  # one scale per token, no RoPE: the keys' magic values scored
  token = dataclasses.replace(int4, quant_group=int4.k_rank)
  plain = MosaicConfig(block_s=64, stages=4, splits=1)
  assert _cfg_str(plain, token, False) == (
      "bs=64 P=1 stages=4 raw_keys raw_values")
  assert _cfg_str(plain, token, True) == "bs=64 P=1 stages=4"
  assert _cfg_str(dataclasses.replace(plain, int4_raw_keys=False), token,
                  False) == "bs=64 P=1 stages=4"
  conv = dataclasses.replace(plain, int4_converter=True)
  assert _cfg_str(conv, token, False) == (
      "bs=64 P=1 stages=4 raw_keys converters=1")
  assert _cfg_str(dataclasses.replace(plain, int4_raw_values=False), token,
                  False) == "bs=64 P=1 stages=4 raw_keys"
  two = dataclasses.replace(conv, int4_converters=2)
  assert _cfg_str(two, token, False) == (
      "bs=64 P=1 stages=4 raw_keys converters=2")
  assert _cfg_str(conv, token, True) == "bs=64 P=1 stages=4"
  early = dataclasses.replace(plain, values_during_scores=True)
  assert _cfg_str(early, token, False) == (
      "bs=64 P=1 stages=4 raw_keys raw_values values_during_scores")
  assert _cfg_str(early, token, True) == "bs=64 P=1 stages=4"
  # the int8 rebuild: int4 keys with RoPE and one scale per token only
  i8 = dataclasses.replace(plain, int4_int8_rebuild=True)
  assert _cfg_str(i8, token, True) == "bs=64 P=1 stages=4 int8_rebuild"
  assert _cfg_str(i8, token, False) == (
      "bs=64 P=1 stages=4 raw_keys raw_values")
  assert _cfg_str(i8, int4, True) == "bs=64 P=1 stages=4"
  assert _cfg_str(dataclasses.replace(i8, int4_int8_keys_smem=False), token,
                  True) == "bs=64 P=1 stages=4 int8_rebuild int8_keys_in_registers"


def _stub_bench(monkeypatch, configs):
  """bench_kernels with `configs` as its launch configs and every
  measurement a constant row: what `run` times, not how fast."""
  from eval import bench_kernels as bk
  monkeypatch.setattr(bk, "_configs", configs)
  monkeypatch.setattr(bk, "_measure", lambda name, *a, **k: {
      "variant": name, "us": 1.0, "bytes": 1, "gbps": 1.0, "tflops": 1.0})
  return bk


def test_bench_kernels_falls_back_only_where_no_backend_takes_the_shape(
    monkeypatch):
  """`--fallback`: a variant gets the fallback backend's row only when the
  listed backends have no config for it (here Mosaic GPU refuses int4
  with RoPE); `--low-bit-groups`: bits < 16 only at those group sizes."""
  calls = []

  def configs(backend, spec, batch, ctx, rope, *rest):
    calls.append((backend, spec.bits, spec.kv_per_group, rope))
    if backend == "mosaic_gpu" and spec.bits == 4 and rope:
      return []
    return [None]
  bk = _stub_bench(monkeypatch, configs)
  rows = bk.run(["llama3-8b"], [1], [256], [0.5], [16, 4], tune=False,
                save=lambda rows: None, groups=(4, 1), low_bit_groups=(4,),
                backends=("mosaic_gpu",), fallback="xla",
                baselines=("xla",), timer=lambda *a: 1e-3)
  got = {(r["variant"], r.get("backend")) for r in rows
         if r["variant"].startswith("palu")}
  assert got == {("palu50_rope", "mosaic_gpu"), ("palu50_norope", "mosaic_gpu"),
                 ("palu50_rope_g1", "mosaic_gpu"),
                 ("palu50_norope_g1", "mosaic_gpu"),
                 ("palu50_rope_int4", "xla"),
                 ("palu50_norope_int4", "mosaic_gpu")}
  assert ("xla", 4, 4, False) not in calls          # Mosaic GPU took it
  assert not [c for c in calls if c[1] == 4 and c[2] == 1]


def test_bench_kernels_int_scales_time_both_scale_layouts(monkeypatch):
  """`--int-scales group token`: each integer-code variant is timed with a
  scale per 32 latents and with one per token and latent group (rows
  `..._qtoken`, whose spec has quant_group = the rank); 16-bit rows
  once; in either order of the list."""
  seen = []

  def configs(backend, spec, batch, ctx, rope, *rest):
    seen.append((spec.bits, spec.quant_group, spec.k_rank))
    return [None]
  bk = _stub_bench(monkeypatch, configs)

  def run(int_scales):
    seen.clear()
    return bk.run(["llama3-8b"], [1], [256], [0.5], [16, 4], tune=False,
                  save=lambda rows: None, groups=(4,), paths=("norope",),
                  backends=("mosaic_gpu",), baselines=("xla",),
                  int_scales=int_scales, timer=lambda *a: 1e-3)
  rows = run(("group", "token"))
  assert [r["variant"] for r in rows if r["variant"].startswith("palu")] == [
      "palu50_norope", "palu50_norope_int4", "palu50_norope_int4_qtoken"]
  rank = seen[0][2]
  assert seen[1:] == [(4, 32, rank), (4, rank, rank)]
  rows = run(("token", "group"))
  assert [r["variant"] for r in rows if r["variant"].startswith("palu")] == [
      "palu50_norope", "palu50_norope_int4_qtoken", "palu50_norope_int4"]
  assert seen[1:] == [(4, rank, rank), (4, 32, rank)]


def test_bench_kernels_append_keeps_only_rows_not_retimed(tmp_path):
  import json

  from eval.bench_kernels import rows_of_other_runs
  path = tmp_path / "b.json"
  assert rows_of_other_runs(str(path), ["llama2-7b"], [1]) == []
  rows = [{"shape": "llama2-7b", "batch": 1, "us": 1},
          {"shape": "llama2-7b", "batch": 8, "us": 2},
          {"shape": "llama3-8b", "batch": 1, "us": 3}]
  path.write_text(json.dumps(rows))
  assert rows_of_other_runs(str(path), ["llama2-7b"], [1, 8]) == rows[2:]
  assert rows_of_other_runs(str(path), ["llama2-7b", "llama3-8b"],
                            [1]) == rows[1:2]
  path.write_text("{}")
  with pytest.raises(ValueError, match="b.json"):
    rows_of_other_runs(str(path), ["llama2-7b"], [1])


@pytest.mark.parametrize("link", ["barrier", "perturb"])
def test_bench_chain_keeps_every_call(link):
  """A chain of n calls compiles to n distinct calls (none merged as a
  common subexpression or dropped as dead code), with either link."""
  import jax
  import jax.numpy as jnp

  from eval.bench_kernels import _chain
  fn = lambda q, w: jnp.tanh(q @ w)
  q, w = jnp.ones((4, 64)), jnp.full((64, 64), 0.01)
  hlo = _chain(fn, 5, link).lower(q, w).compile().as_text()
  assert hlo.count("tanh(") == 5
  last_q, outs = _chain(fn, 5, link)(q, w)
  assert last_q.shape == q.shape
  # the barrier link returns the calls' outputs (what keeps them alive)
  assert len(outs) == (5 if link == "barrier" else 0)


def test_bench_chain_link_is_checked():
  from eval.bench_kernels import _chain
  with pytest.raises(ValueError, match="chain link 'add'"):
    _chain(lambda q: q, 2, "add")


def test_variant_names_are_the_issues_row_names():
  """The rows issues 17 and 18 name (`palu50_rope`, `palu50_rope_g2`,
  `palu50_norope_fp8`, ...), as bench_kernels and profile_kernel both
  write them."""
  from eval.bench_kernels import variant_name
  assert variant_name(0.5, True, 16, 4) == "palu50_rope"
  assert variant_name(0.5, True, 16, 2) == "palu50_rope_g2"
  assert variant_name(0.5, False, 16, 1) == "palu50_norope_g1"
  assert variant_name(0.5, True, 8, 4) == "palu50_rope_fp8"
  assert variant_name(0.5, False, 4, 4) == "palu50_norope_int4"
  assert variant_name(0.3, False, 4, 2, shared=True, per_token=True) == (
      "palu30_norope_int4_g2_shared_qtoken")
