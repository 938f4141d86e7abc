"""Decode speed on device meshes: the cost of sharding and its scaling.

For each variant (dense on its best decode kernel, Palu 50 % M-LRD, ...),
the jitted decode loop of `eval.bench_e2e` is timed unsharded and on each
mesh given (`--meshes data=1,model=1 model=2 ...`; "none" is the unsharded
path), with the parameters placed by their logical axes and the cache by
`palu_jax.sharding.shard.cache_shardings`. Per row: ms per step, tokens/s,
the ratio to the unsharded path of the same variant on one device
(`vs_unsharded`), the scaling efficiency against the one-device mesh
(tokens/s ÷ (devices × one-device tokens/s)), and the largest context that
fits at that batch (per-device free memory after the weights ÷ per-device
cache bytes per token).

  python -m eval.bench_sharded [--model llama2-7b] [--batch 8]
      [--context 16384] [--meshes none data=1,model=1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from eval.bench_decode import SHAPES, bench_one, cache_len, measure_bandwidth
from eval.bench_e2e import build, palu_config, variant_spec
from eval.plots import plot_results
from eval.report import markdown_table, write_results
from palu_jax.sharding.mesh import make_mesh, spec_devices


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
  ap.add_argument("--variants", nargs="+", default=["base", "palu50_g1"],
                  help="as eval/bench_e2e.py: base or palu<percent>[_fp8|"
                  "_int4][_g<n>][_shared]")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--context", type=int, default=16384)
  ap.add_argument("--meshes", nargs="+", default=["none", "data=1,model=1"],
                  help='"none" (unsharded) or data=D,model=M specs')
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  ap.add_argument("--name", default="bench_sharded")
  args = ap.parse_args(argv)
  cfg = SHAPES[args.model]
  devices = jax.devices()
  limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
  bw = measure_bandwidth(1.0)["reference"]      # for bench_one's fractions
  rows: list[dict] = []
  cols = ["variant", "mesh", "devices", "batch", "context", "ms_per_step",
          "tokens_per_s", "vs_unsharded", "scaling_efficiency",
          "max_context", "note"]

  def save():
    md = (f"# Sharded decode, {args.model} shapes ({devices[0].device_kind}"
          f" x{len(devices)})\n\nbf16, greedy, {args.steps} steps per "
          "timing. vs_unsharded: tokens/s over the unsharded path of the "
          "same variant; scaling_efficiency: tokens/s over devices x the "
          "one-device mesh's; max_context: the longest context whose "
          "per-device cache fits next to the per-device weights (92 % of "
          "the memory limit).\n\n" + markdown_table(rows, cols))
    jpath, _ = write_results(args.out, args.name,
                             {"device": devices[0].device_kind,
                              "n_devices": len(devices), "rows": rows}, md)
    try:
      plot_results(jpath)
    except Exception as e:      # a plot is a convenience, never a failure
      print(f"plot skipped: {e}", file=sys.stderr)

  for name in args.variants:
    spec = variant_spec(name)
    palu = None if spec is None else palu_config(cfg, *spec)
    model = build(cfg, palu, jnp.bfloat16,
                  "xla" if name == "base_xla" else None)
    base_tps, one_tps = None, None
    for mesh_spec in args.meshes:
      mesh = None if mesh_spec == "none" else make_mesh(
          mesh_spec, devices[:spec_devices(mesh_spec)])
      n = 1 if mesh is None else mesh.size
      row = {"variant": name, "mesh": mesh_spec, "devices": n,
             "batch": args.batch, "context": args.context,
             "device": devices[0].device_kind}
      t0 = time.perf_counter()
      try:
        graphdef, state = nnx.split(model)
        row.update(bench_one(model, graphdef, state, batch=args.batch,
                             ctx=args.context, steps=args.steps,
                             repeats=args.repeats, bw=bw, mesh=mesh))
      except jax.errors.JaxRuntimeError as e:
        row["note"] = f"failed: {str(e).splitlines()[0][:100]}"
      row["wall_s"] = time.perf_counter() - t0
      tps = row.get("tokens_per_s")
      if tps:
        if mesh is None:
          base_tps = tps
        if n == 1 and mesh is not None:
          one_tps = one_tps or tps
        row["vs_unsharded"] = tps / base_tps if base_tps else None
        row["scaling_efficiency"] = (tps / (n * one_tps) if one_tps
                                     else None)
        per_tok = row["cache_bytes_per_device"] / (
            args.batch * cache_len(args.context, args.steps))
        if limit and per_tok:
          row["max_context"] = int((0.92 * limit - row[
              "weight_bytes_per_device"]) / (args.batch * per_tok))
      rows.append(row)
      save()
      print({k: (round(v, 3) if isinstance(v, float) else v)
             for k, v in row.items() if k in cols}, flush=True)
    del model
  return 0


if __name__ == "__main__":
  sys.exit(main())
