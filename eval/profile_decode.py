"""Where a decode step's time goes: GPU kernel time by kind against wall time.

Traces the jitted decode loop of `eval.bench_e2e` (7B shapes, pseudo-random
weights) with `jax.profiler` and sums the GPU kernels of the traced run:
per step, the wall time, the time the GPU was busy (union of kernel
intervals), the kernels launched, and the time per kind (latent attention,
cuDNN attention, matmuls, copies, other fusions), plus the kernels that
take the most time. A step whose busy time is well below its wall time is
bound by launches, not by the GPU. A diagnostic for the end-to-end gap
between the kernel benchmark and `eval/bench_e2e.py`.

  python -m eval.profile_decode [--variants base palu50_g1] [--contexts 4096]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from eval.bench_decode import (SHAPES, _decode, _random_cache, cache_len)
from eval.bench_e2e import build, palu_config, variant_spec
from eval.report import markdown_table, write_results
from eval.trace_events import busy_us, gpu_kernel_events
from palu_jax.generate import DecodeState

KINDS = (  # (kind, substrings of a kernel name), first match wins
    ("latent_attn", ("palu_latent", "latent", "mosaic")),
    ("cudnn_attn", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "triton_gemm")),
    ("copy", ("memcpy", "memset", "copy", "dynamic_update_slice")),
)


def kernel_kind(name: str) -> str:
  low = name.lower()
  for kind, keys in KINDS:
    if any(k in low for k in keys):
      return kind
  return "other"


def summarize(events: list[dict], steps: int, wall_s: float) -> dict:
  by_kind = collections.defaultdict(float)
  by_name = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    by_kind[kernel_kind(e["name"])] += float(e["dur"])
    by_name[e["name"]][0] += float(e["dur"])
    by_name[e["name"]][1] += 1
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
  top = ranked[:12]
  # the small XLA fusions around the kernels (where per-layer glue goes)
  top_other = [kv for kv in ranked if kernel_kind(kv[0]) == "other"][:12]
  return {
      "wall_ms_per_step": 1e3 * wall_s / steps,
      "gpu_busy_ms_per_step": busy_us(events) / 1e3 / steps,
      "kernels_per_step": len(events) / steps,
      **{f"{k}_ms_per_step": v / 1e3 / steps for k, v in by_kind.items()},
      "top": [{"name": n[:90], "ms_per_step": t / 1e3 / steps,
               "per_step": c / steps} for n, (t, c) in top],
      "top_other": [{"name": n[:90], "ms_per_step": t / 1e3 / steps,
                     "per_step": c / steps} for n, (t, c) in top_other],
  }


def profile_variant(name: str, cfg, *, batch: int, ctx: int, steps: int,
                    keep_trace: str | None, hlo_path: str | None = None
                    ) -> dict:
  spec = variant_spec(name)
  palu = None if spec is None else palu_config(cfg, *spec)
  model = build(cfg, palu, jnp.bfloat16,
                "xla" if name == "base_xla" else None)
  graphdef, state = nnx.split(model)
  cache = _random_cache(model, batch=batch, max_len=cache_len(ctx, steps))

  def fresh(cache):
    return DecodeState(
        cache=cache.replace(lengths=jnp.full((batch,), ctx, jnp.int32)),
        tokens=jnp.zeros((batch, steps + 8), jnp.int32),
        last=jnp.arange(batch, dtype=jnp.int32) + 5, step=jnp.int32(0),
        done=jnp.zeros((batch,), bool), key=jax.random.key(0))
  if hlo_path:   # the optimized HLO names the fusions the trace lists
    text = _decode_hlo(graphdef, state, fresh(cache), steps=steps)
    with open(hlo_path, "w") as f:
      f.write(text)
  out = _decode(graphdef, state, fresh(cache), steps=steps)   # compile
  jax.block_until_ready(out)
  out = _decode(graphdef, state, fresh(out.cache), steps=steps)
  jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      t0 = time.perf_counter()
      out = _decode(graphdef, state, fresh(out.cache), steps=steps)
      jax.block_until_ready(out.tokens)
      wall = time.perf_counter() - t0
    [path] = glob.glob(os.path.join(tmp, "plugins", "profile", "*",
                                    "*.trace.json.gz"))
    if keep_trace:
      shutil.copy(path, keep_trace)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = gpu_kernel_events(trace)
  return summarize(events, steps, wall)


def _decode_hlo(graphdef, state, init, *, steps: int) -> str:
  """The optimized HLO text of `_decode`'s jitted loop for these inputs."""
  return _decode.lower(graphdef, state, init, steps=steps).compile().as_text()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
  ap.add_argument("--variants", nargs="+", default=["base", "palu50_g1"],
                  help="as eval/bench_e2e.py: base or palu<percent>[_fp8|"
                  "_int4][_g<n>][_shared]")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--contexts", type=int, nargs="+", default=[4096])
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--keep-traces", default=None,
                  help="folder to copy each raw trace.json.gz into")
  ap.add_argument("--dump-hlo", default=None,
                  help="folder to write each decode loop's optimized HLO to")
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  ap.add_argument("--name", default="profile_decode")
  args = ap.parse_args(argv)
  cfg = SHAPES[args.model]
  rows = []
  for name in args.variants:
    for ctx in args.contexts:
      keep = None
      if args.keep_traces:
        os.makedirs(args.keep_traces, exist_ok=True)
        keep = os.path.join(args.keep_traces, f"{name}_{ctx}.trace.json.gz")
      hlo = None
      if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        hlo = os.path.join(args.dump_hlo, f"{name}_{ctx}.hlo.txt")
      row = {"variant": name, "batch": args.batch, "context": ctx,
             "device": jax.devices()[0].device_kind,
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
      row.update(profile_variant(name, cfg, batch=args.batch, ctx=ctx,
                                 steps=args.steps, keep_trace=keep,
                                 hlo_path=hlo))
      rows.append(row)
      print({k: (round(v, 3) if isinstance(v, float) else v)
             for k, v in row.items() if not k.startswith("top")},
            flush=True)
      for t in row["top"][:6]:
        print("   ", t, flush=True)
      for t in row["top_other"][:8]:
        print("    other:", t, flush=True)
  kinds = sorted({k for r in rows for k in r if k.endswith("_ms_per_step")
                  and k not in ("wall_ms_per_step", "gpu_busy_ms_per_step")})
  cols = ["variant", "batch", "context", "wall_ms_per_step",
          "gpu_busy_ms_per_step", "kernels_per_step", *kinds]
  md = (f"# Decode step profile, {args.model} shapes\n\n"
        "jax.profiler trace of one jitted decode run; GPU kernel time per "
        "step by kind, busy = union of kernel intervals.\n\n"
        + markdown_table(rows, cols))
  write_results(args.out, args.name, {"rows": rows}, md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
