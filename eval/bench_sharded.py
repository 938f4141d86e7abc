"""Decode speed and compression time on device meshes: the cost of
sharding and its scaling.

Decode (the default): for each variant (dense on its best decode kernel,
Palu 50 % M-LRD, ...), mesh, batch and context, the jitted decode loop of
`eval.bench_e2e` is timed, unsharded ("none") and on each mesh given
(`--meshes none model=1 model=2 data=2,model=4 ...`). The weights are made
straight into their shards on each mesh and the cache likewise
(`bench_decode.fill_sharded`), so a 70B-shaped model never has to fit one
device. Per row: ms per step, tokens/s, the ratio to the unsharded path
(`vs_unsharded`), the scaling efficiency against the mesh of fewest devices
that ran the same variant, batch and context (tokens/s ÷ (devices ÷ its
devices × its tokens/s); `scaling_base` names its device count), the
per-device weight and cache bytes, and the longest context that fits at
batch 1 on that mesh. A row whose per-device weights and cache would
exceed 92 % of a device's memory is not run ("does not fit").

Compression (`--task compress`): calibration of the dense model (Gram
matrices and Fisher scores, data-parallel: windows over "data") and the
decomposition (each layer's group SVDs spread over the mesh's devices),
the library's default Palu 50 %, timed on each mesh.

Plan (`--task plan`): what each device would hold, from shapes alone, on
any machine (`eval/sharded_sizes.py`). `--append` keeps the rows of earlier
calls in the results file, so a multi-GPU run of several calls (one per
model or variant, as `eval/device/sharded.sh`) ends in one file.

  python -m eval.bench_sharded [--model llama2-7b] [--variants base palu50_g1]
      [--batches 1 16] [--contexts 16384 65536] [--meshes none model=2 ...]
  python -m eval.bench_sharded --task compress --meshes data=1 data=2 data=8
  python -m eval.bench_sharded --task plan --model llama2-70b --meshes model=8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.bench_decode import SHAPES, bench_one, cache_len, measure_bandwidth
from eval.bench_e2e import build, palu_config, variant_spec
from eval.plots import plot_results
from eval.report import markdown_table, write_results
from eval.sharded_sizes import FIT, footprint, longest_context
from palu_jax.sharding.mesh import make_mesh, spec_devices

DECODE_COLS = ["model", "variant", "mesh", "devices", "batch", "context",
               "ms_per_step", "tokens_per_s", "vs_unsharded",
               "scaling_efficiency", "scaling_base", "weight_gib_per_device",
               "cache_gib_per_device", "max_context_b1", "note"]
COMPRESS_COLS = ["model", "mesh", "devices", "windows", "seqlen",
                 "cold_total_s", "grams_s", "fisher_s", "decompose_s",
                 "total_s", "speedup", "scaling_efficiency", "note"]
PLAN_COLS = ["model", "variant", "mesh", "devices", "batch", "context",
             "weight_gib_per_device", "cache_gib_per_device",
             "total_gib_per_device", "fits", "max_context_b1"]


def _mesh(spec: str, devices):
  return None if spec == "none" else make_mesh(
      spec, devices[:spec_devices(spec)])


def fill_ratios(rows: list[dict], value: str, key: tuple[str, ...],
                faster: bool) -> None:
  """Adds vs_unsharded (decode) and scaling_efficiency / scaling_base to
  rows in place: against the "none" row and against the row of fewest
  devices on a mesh, of the same `key` fields. faster: `value` grows with
  speed (tokens/s) rather than with time (seconds)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r.get(value):
      groups.setdefault(tuple(r[k] for k in key), []).append(r)
  for group in groups.values():
    none = [r for r in group if r["mesh"] == "none"]
    meshed = sorted((r for r in group if r["mesh"] != "none"),
                    key=lambda r: r["devices"])
    for r in group:
      speed = (lambda x: x[value]) if faster else (lambda x: 1 / x[value])
      if faster and none:
        r["vs_unsharded"] = speed(r) / speed(none[0])
      if meshed and r["mesh"] != "none":
        b = meshed[0]
        r["scaling_base"] = b["devices"]
        r["scaling_efficiency"] = (speed(r) / speed(b)) / (
            r["devices"] / b["devices"])
        if not faster:
          r["speedup"] = speed(r) / speed(b)


def decode_rows(args, cfg, devices, limit, bw, save, rows: list[dict]
                ) -> list[dict]:
  """Times every variant x mesh x batch x context, appending to `rows`."""
  combos = sorted(((b, c) for b in args.batches for c in args.contexts),
                  key=lambda bc: bc[0] * bc[1])       # ascending memory
  for name in args.variants:
    spec = variant_spec(name)
    palu = None if spec is None else palu_config(
        cfg, *spec, scale_per_token=args.scale_per_token)
    for mesh_spec in args.meshes:
      mesh = _mesh(mesh_spec, devices)
      n = 1 if mesh is None else mesh.size
      weights, cache = footprint(cfg, palu, mesh)
      b1 = longest_context(limit, weights, cache, 1) if limit else None
      model = None
      for batch, ctx in combos:
        need = weights + cache(batch, cache_len(ctx, args.steps))
        row = {"model": args.model, "variant": name, "mesh": mesh_spec,
               "devices": n, "batch": batch, "context": ctx,
               "layers": cfg.n_layers,
               "device": devices[0].device_kind,
               "weight_gib_per_device": weights / 2**30,
               "cache_gib_per_device": (need - weights) / 2**30,
               "max_context_b1": b1}
        if limit and need > FIT * limit:
          row["note"] = (f"does not fit: {need / 2**30:.0f} GiB a device "
                         f"of {FIT * limit / 2**30:.0f}")
        else:
          t0 = time.perf_counter()
          try:
            if model is None:
              model = build(cfg, palu, jnp.bfloat16,
                            "xla" if name == "base_xla" else None, mesh=mesh)
              row["build_s"] = time.perf_counter() - t0
            graphdef, state = nnx.split(model)
            row.update(bench_one(model, graphdef, state, batch=batch,
                                 ctx=ctx, steps=args.steps,
                                 repeats=args.repeats, bw=bw, mesh=mesh))
          except jax.errors.JaxRuntimeError as e:      # out of memory
            row["note"] = f"failed: {str(e).splitlines()[0][:100]}"
          row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        fill_ratios(rows, "tokens_per_s", ("model", "layers", "variant",
                                           "batch", "context"), faster=True)
        save(rows)
        print({k: (round(v, 3) if isinstance(v, float) else v)
               for k, v in row.items() if k in DECODE_COLS}, flush=True)
      del model
  return rows


def compress_rows(args, cfg, devices, save, rows: list[dict]
                  ) -> list[dict]:
  """Calibration + decomposition wall time on each mesh (data-parallel
  calibration: `--calib-batch-per-device` windows a device per step),
  appended to `rows`."""
  from palu_jax.calibrate.activations import kv_input_grams
  from palu_jax.calibrate.fisher import kv_fisher
  from palu_jax.calibrate.statistics import CalibrationStats
  from palu_jax.compress import CompressionConfig, compress_params
  from palu_jax.sharding.shard import to_host
  comp = CompressionConfig(ratio=0.5).resolved(cfg)
  comp.validate(cfg)
  # token ids stand in for text: the time does not depend on which tokens
  windows = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (args.calib_windows, args.calib_seqlen))
  for mesh_spec in args.meshes:
    mesh = _mesh(mesh_spec, devices)
    n = 1 if mesh is None else mesh.size
    data = 1 if mesh is None else mesh.shape["data"]
    row = {"model": args.model, "mesh": mesh_spec, "devices": n,
           "windows": len(windows),
           "seqlen": args.calib_seqlen, "layers": cfg.n_layers,
           "batch_size": data * args.calib_batch_per_device,
           "device": devices[0].device_kind}
    if len(windows) % row["batch_size"]:
      row["note"] = (f"{len(windows)} windows are not a multiple of the "
                     f"batch of {row['batch_size']}")
      rows.append(row)
      continue
    try:
      model = build(cfg, None, jnp.dtype(args.calib_dtype), "xla",
                    mesh=mesh)
      base = {".".join(map(str, path)): to_host(v.get_value())
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
      # twice: the first run compiles (what one `palu-jax compress` pays),
      # the second is the steady state the scaling is read from
      for run in ("cold_", ""):
        t0 = time.perf_counter()
        grams, tokens = kv_input_grams(model, windows,
                                       batch_size=row["batch_size"],
                                       progress=False, mesh=mesh)
        t1 = time.perf_counter()
        fisher = kv_fisher(model, windows, batch_size=row["batch_size"],
                           progress=False, mesh=mesh)
        t2 = time.perf_counter()
        stats = CalibrationStats(grams=grams, tokens=tokens, fisher=fisher)
        compress_params(cfg, base, stats, comp, seqlen=args.calib_seqlen,
                        devices=None if mesh is None else mesh.local_devices)
        t3 = time.perf_counter()
        row.update({f"{run}grams_s": t1 - t0, f"{run}fisher_s": t2 - t1,
                    f"{run}decompose_s": t3 - t2, f"{run}total_s": t3 - t0})
      del model, base
    except jax.errors.JaxRuntimeError as e:
      row["note"] = f"failed: {str(e).splitlines()[0][:100]}"
    rows.append(row)
    fill_ratios(rows, "total_s", ("model", "layers", "windows", "seqlen"),
                faster=False)
    save(rows)
    print({k: (round(v, 3) if isinstance(v, float) else v)
           for k, v in row.items() if k in COMPRESS_COLS}, flush=True)
  return rows


def kept_rows(path: str, args) -> list[dict]:
  """The rows of an earlier call's results file that this call does not
  measure again (other models, layer counts, variants, meshes, batches or
  contexts)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = json.load(f)["rows"]
  layers = args.layers or SHAPES[args.model].n_layers

  def again(r) -> bool:
    if (r.get("model"), r.get("layers")) != (args.model, layers) or (
        r["mesh"] not in args.meshes):
      return False
    if args.task == "compress":
      return (r.get("windows"), r.get("seqlen")) == (args.calib_windows,
                                                     args.calib_seqlen)
    return (r["variant"] in args.variants and r["batch"] in args.batches
            and r["context"] in args.contexts)
  return [r for r in old if not again(r)]


def plan_rows(args, cfg, memory: float) -> list[dict]:
  """What each device would hold, from shapes alone (no device needed:
  abstract meshes): weights, cache, whether they fit `memory` bytes (at
  92 %), and the longest context at batch 1."""
  from jax.sharding import AbstractMesh
  from palu_jax.sharding.mesh import MESH_AXES, parse_mesh
  rows = []
  for name in args.variants:
    spec = variant_spec(name)
    palu = None if spec is None else palu_config(
        cfg, *spec, scale_per_token=args.scale_per_token)
    for mesh_spec in args.meshes:
      mesh = None
      if mesh_spec != "none":
        sizes = parse_mesh(mesh_spec, spec_devices(mesh_spec))
        mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
      weights, cache = footprint(cfg, palu, mesh)
      b1 = longest_context(memory, weights, cache, 1)
      for batch in args.batches:
        for ctx in args.contexts:
          c = cache(batch, cache_len(ctx, args.steps))
          rows.append({"model": args.model, "variant": name,
                       "mesh": mesh_spec,
                       "devices": 1 if mesh is None else mesh.size,
                       "batch": batch, "context": ctx,
                       "layers": cfg.n_layers,
                       "weight_gib_per_device": weights / 2**30,
                       "cache_gib_per_device": c / 2**30,
                       "total_gib_per_device": (weights + c) / 2**30,
                       "fits": weights + c <= FIT * memory,
                       "max_context_b1": b1})
  return rows


def default_name(task: str, devices) -> str:
  """bench_sharded_h200x8 (decode) / bench_sharded_compress_h200x8."""
  kind = devices[0].device_kind.lower().replace("nvidia", "").strip()
  kind = "".join(c for c in kind.split()[0] if c.isalnum()) if kind else "x"
  stem = "bench_sharded" if task == "decode" else "bench_sharded_compress"
  return f"{stem}_{kind}x{len(devices)}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--task", choices=("decode", "compress", "plan"),
                  default="decode",
                  help="plan: per-device sizes from shapes alone, against "
                  "--memory-gib, on any machine (no devices used)")
  ap.add_argument("--memory-gib", type=float, default=None,
                  help="--task plan: one device's memory [the first "
                  "device's limit; 139 (an H200) without one]")
  ap.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
  ap.add_argument("--layers", type=int, default=None,
                  help="decoder layers instead of the shape's own (each "
                  "layer's work unchanged)")
  ap.add_argument("--variants", nargs="+", default=["base", "palu50_g1"],
                  help="as eval/bench_e2e.py: base or palu<percent>[_fp8|"
                  "_int4][_g<n>][_shared]")
  ap.add_argument("--batches", "--batch", nargs="+", type=int, default=[8])
  ap.add_argument("--contexts", "--context", nargs="+", type=int,
                  default=[16384])
  ap.add_argument("--meshes", nargs="+", default=["none", "data=1,model=1"],
                  help='"none" (unsharded) or data=D,model=M specs')
  ap.add_argument("--scale-per-token", action="store_true",
                  help="integer-code variants: one scale per token and "
                  "latent group (as eval/bench_e2e.py)")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--calib-windows", type=int, default=32)
  ap.add_argument("--calib-seqlen", type=int, default=512)
  ap.add_argument("--calib-batch-per-device", type=int, default=1)
  ap.add_argument("--calib-dtype", default="float32",
                  help="the dense model's dtype while calibrating (the "
                  "`palu-jax compress` default)")
  ap.add_argument("--append", action="store_true",
                  help="keep the rows already in the results file that this "
                  "call does not measure (one device call per model or "
                  "variant, one file)")
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  ap.add_argument("--name", default=None,
                  help="[bench_sharded_<device>x<count>, or "
                  "bench_sharded_compress_... with --task compress]")
  args = ap.parse_args(argv)
  cfg = SHAPES[args.model]
  if args.layers is not None:
    if args.layers < 1:
      raise SystemExit(f"--layers {args.layers}: needs at least 1")
    cfg = dataclasses.replace(cfg, n_layers=args.layers)
  if args.task == "plan":
    memory = args.memory_gib * 2**30 if args.memory_gib else (
        (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        or 139 * 2**30)
    rows = plan_rows(args, cfg, memory)
    name = args.name or "bench_sharded_plan"
    md = (f"# Per-device sizes, {args.model} shapes (from shapes alone)\n\n"
          f"bf16 weights; one device of {memory / 2**30:.0f} GiB, fits: at "
          f"most {FIT:.0%} of it; a cache of context + {args.steps} steps + "
          "the decode loop's slack. max_context_b1: the longest context "
          "whose cache fits next to the weights at batch 1, by memory "
          "alone (not the model's trained context).\n\n"
          + markdown_table(rows, PLAN_COLS))
    write_results(args.out, name, {"task": "plan", "model": args.model,
                                   "memory_bytes": memory, "rows": rows}, md)
    print(md)
    return 0
  devices = jax.devices()
  for spec in args.meshes:
    if spec != "none" and spec_devices(spec) > len(devices):
      raise SystemExit(f"--meshes {spec}: needs {spec_devices(spec)} "
                       f"devices, {len(devices)} are here")
  name = args.name or default_name(args.task, devices)
  limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
  layers = ("" if args.layers is None else
            f", {cfg.n_layers} decoder layers (not the shape's own)")

  def save(rows):
    if args.task == "decode":
      head = (f"bf16, greedy, {args.steps} steps per timing{layers}. "
              "vs_unsharded: tokens/s over the unsharded path of the same "
              "variant; scaling_efficiency: tokens/s over (devices / "
              "scaling_base) x the tokens/s of the mesh of scaling_base "
              "devices (the fewest that ran it); max_context_b1: the "
              "longest context whose per-device cache fits next to the "
              f"per-device weights at batch 1 ({FIT:.0%} of the memory "
              "limit).")
      cols, title = DECODE_COLS, "Sharded decode"
    else:
      head = (f"Calibration ({args.calib_dtype}; Gram matrices and Fisher "
              "scores, data-parallel) and the decomposition (Palu 50 %, "
              f"the library's defaults){layers}. cold_total_s: the first "
              "run, compilation included (what one `palu-jax compress` "
              "waits); the other times are a second run on the same mesh, "
              "and speedup and scaling_efficiency compare its total_s with "
              "the mesh of fewest devices.")
      cols, title = COMPRESS_COLS, "Sharded compression"
    models = ", ".join(dict.fromkeys(r.get("model", args.model)
                                     for r in rows))
    md = (f"# {title}, {models} shapes ({devices[0].device_kind} "
          f"x{len(devices)})\n\n{head}\n\n" + markdown_table(rows, cols))
    jpath, _ = write_results(args.out, name,
                             {"device": devices[0].device_kind,
                              "n_devices": len(devices), "task": args.task,
                              "model": args.model, "rows": rows}, md)
    try:
      plot_results(jpath)
    except Exception as e:      # a plot is a convenience, never a failure
      print(f"plot skipped: {e}", file=sys.stderr)

  rows = kept_rows(os.path.join(args.out, name + ".json"), args) if (
      args.append) else []
  if args.task == "decode":
    bw = measure_bandwidth(1.0)["reference"]      # for bench_one's fractions
    decode_rows(args, cfg, devices, limit, bw, save, rows)
  else:
    compress_rows(args, cfg, devices, save, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
