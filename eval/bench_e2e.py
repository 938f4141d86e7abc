"""End-to-end decode: base vs Palu-compressed 7B-shaped models.

The jitted decode loop of `palu_jax.generate` (what `Generator` runs) is
timed for Llama-2-7B shapes with pseudo-random weights: the base model
(bf16 KV cache; decode attention on cuDNN, the fastest full-KV kernel
in eval/bench_kernels, and as `base_xla` on jnp attention), and Palu at 50 % with 16-bit and int4
latents, decoding through the Pallas kernels: G-LRD (groups of 4 KV heads)
and M-LRD (`_g1`, one head per latent: keys are rebuilt with a quarter of
the FLOPs and B_k stays on chip). Per
row: ms per step, tokens/s, the speedup over base at the same batch and
context, the cache's bytes, and the largest context that fits at that batch
(free memory after the weights / cache bytes per token).

  python -m eval.bench_e2e [--contexts 4096 16384 65536] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from eval.bench_decode import (SHAPES, _fill, bench_one, fill_sharded,
                               measure_bandwidth)
from eval.plots import plot_results
from eval.report import markdown_table, write_results
from eval.sharded_sizes import FIT, footprint, longest_context
from palu_jax.config import PaluConfig
from palu_jax.model import Transformer

GROUP = 4


def palu_config(cfg, ratio: float, bits: int, group: int = GROUP,
                shared: bool = False, scale_per_token: bool = False
                ) -> PaluConfig:
  """Uniform ranks keeping 1 - ratio of each group's key/value width;
  shared: one latent of twice the rank for keys and values (the default
  compression of small models such as SmolLM2-135M). Scales as the
  library's default (`cache_quant_group`): one per token and latent group
  for float8 (the format the Mosaic GPU fp8 path reads), one per 32
  latents for integer codes; scale_per_token: one per token and group for
  integer codes too. float8 latents come with an e4m3 B_k (`--k-up-bits
  8`), which the Mosaic GPU kernel's fp8 key rebuild takes (with a 16-bit
  B_k it refuses RoPE calls)."""
  size = min(group, cfg.n_kv_heads)
  width = (2 if shared else 1) * size * cfg.head_dim
  rank = int(round((1 - ratio) * width / 16)) * 16
  ranks = ((rank,) * (cfg.n_kv_heads // size),) * cfg.n_layers
  return PaluConfig(group_size=size, k_ranks=ranks, v_ranks=ranks,
                    kv_bits=bits,
                    quant_group=(rank if scale_per_token or bits == 8
                                 else 32),
                    shared_kv=shared, k_up_bits=8 if bits == 8 else 16)


# the default list; any name `variant_spec` parses can be asked for
VARIANTS = ("base", "base_xla", "palu50", "palu50_g2", "palu50_int4",
            "palu50_g1", "palu50_int4_g1", "palu50_shared")
_VARIANT = re.compile(r"^palu(?P<pct>\d{1,2})(?:_(?P<bits>fp8|int[234]))?"
                      r"(?:_g(?P<group>\d+))?(?P<shared>_shared)?$")


def variant_spec(name: str):
  """A variant name -> palu_config's (ratio, bits, group, shared), or None
  for the dense model ("base": decode on the best kernel, "base_xla": jnp
  attention). Names: palu<percent>[_fp8|_int4|_int3|_int2][_g<heads per
  latent>][_shared], e.g. palu50_fp8_g1; no _g: groups of 4; _shared:
  one latent per layer for keys and values (SmolLM2's default)."""
  if name in ("base", "base_xla"):
    return None
  m = _VARIANT.match(name)
  if not m or not 0 < int(m["pct"]) < 100:
    raise SystemExit(f"--variants: cannot read {name!r} (base, base_xla or "
                     "palu<percent>[_fp8|_int4|_int3|_int2][_g<n>][_shared])")
  bits = {None: 16, "fp8": 8}.get(m["bits"]) or int(m["bits"][3:])
  if m["shared"]:
    return int(m["pct"]) / 100, bits, 1024, True
  return int(m["pct"]) / 100, bits, int(m["group"] or GROUP), False


def build(cfg, palu, dtype, dense_decode: str | None = None, mesh=None):
  """dense_decode: the dense model's decode kernel ("cudnn", "xla" or None
  for the best available, `palu_jax.model.dense_decode.pick`); mesh: the
  weights are made straight into their shards on it (`fill_sharded`)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype,
                                                rngs=nnx.Rngs(0), palu=palu))
  graphdef, state = nnx.split(abstract)
  model = nnx.merge(graphdef, _fill(state, 0) if mesh is None
                    else fill_sharded(state, mesh, 0))
  if palu is None:
    for layer in model.layers:
      layer.attn.decode_impl = dense_decode
  return model


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                  help="base, base_xla or palu<percent>[_fp8|_int4|_int3|"
                  "_int2][_g<KV heads per latent>][_shared]")
  ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  ap.add_argument("--contexts", nargs="+", type=int,
                  default=[4096, 16384, 65536])
  ap.add_argument("--scale-per-token", action="store_true",
                  help="integer-code variants: one scale per token and "
                  "latent group instead of one per 32 latents (float8 "
                  "variants always have it, as the library's default)")
  ap.add_argument("--layers", type=int, default=None,
                  help="decoder layers of both models instead of the "
                  "shape's own (each layer's work is unchanged): batch 8 at "
                  "64K, whose dense cache takes 275 GB over Llama-2-7B's 32 "
                  "layers, fits one H200 with 12")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  ap.add_argument("--name", default="bench_e2e")
  ap.add_argument("--mesh", default=None,
                  help="shard parameters and caches on data=D,model=M "
                  "devices [one device; eval/bench_sharded.py compares "
                  "meshes]")
  args = ap.parse_args(argv)
  mesh = None
  if args.mesh:
    from palu_jax.sharding.mesh import make_mesh, spec_devices
    mesh = make_mesh(args.mesh, jax.devices()[:spec_devices(args.mesh)])
  cfg = SHAPES[args.model]
  if args.layers is not None:
    if not 0 < args.layers:
      raise SystemExit(f"--layers {args.layers}: needs at least 1")
    cfg = dataclasses.replace(cfg, n_layers=args.layers)
  device = jax.devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit", 0)
  bw = measure_bandwidth()["reference"]
  rows: list[dict] = []
  cols = ["variant", "batch", "context", "ms_per_step", "tokens_per_s",
          "speedup", "kv_bytes_per_token", "max_context", "note"]

  def save():
    base = {(r["batch"], r["context"]): r.get("tokens_per_s")
            for r in rows if r["variant"] == "base"}
    for r in rows:
      b = base.get((r["batch"], r["context"]))
      r["speedup"] = (r["tokens_per_s"] / b) if b and r.get(
          "tokens_per_s") else None
    layers = (f", {cfg.n_layers} decoder layers (not the shape's own: "
              "both models alike)" if args.layers is not None else "")
    md = (f"# End-to-end decode, {args.model} shapes ({device.device_kind})"
          f"\n\nbf16, greedy, {args.steps} steps per timing{layers}; HBM "
          f"{bw / 1e9:.0f} GB/s measured in this run. max_context: the "
          "longest context whose cache fits next to the weights at that "
          f"batch ({FIT * 100:.0f} % of the device memory limit; with "
          "--mesh, one device's share).\n\n"
          + markdown_table(rows, cols))
    jpath, _ = write_results(args.out, args.name,
                             {"device": device.device_kind, "rows": rows}, md)
    plot_results(jpath)          # a PNG next to it, with matplotlib

  for name in args.variants:
    spec = variant_spec(name)
    palu = None if spec is None else palu_config(
        cfg, *spec, scale_per_token=args.scale_per_token)
    model = build(cfg, palu, jnp.bfloat16,
                  "xla" if name == "base_xla" else None, mesh=mesh)
    graphdef, state = nnx.split(model)
    probe = model.init_cache(1, 1024)
    per_token = probe.nbytes() // 1024
    del probe
    sizes = footprint(cfg, palu, mesh)   # what one device holds
    for batch in args.batches:
      fit = (longest_context(limit, *sizes, batch) if limit
             else None)                  # no memory limit known (CPU)
      for ctx in args.contexts:
        row = {"variant": name, "device": device.device_kind,
               "batch": batch, "context": ctx,
               "kv_bytes_per_token": per_token, "max_context": fit,
               "layers": cfg.n_layers}
        if fit is not None and ctx + args.steps + 256 > fit:
          row["note"] = "does not fit"
        else:
          t0 = time.perf_counter()
          try:
            row.update(bench_one(model, graphdef, state, batch=batch,
                                 ctx=ctx, steps=args.steps,
                                 repeats=args.repeats, bw=bw, mesh=mesh))
          except jax.errors.JaxRuntimeError as e:
            row["note"] = f"failed: {str(e).splitlines()[0][:100]}"
          row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        save()
        print({k: (round(v, 3) if isinstance(v, float) else v)
               for k, v in row.items() if k in cols}, flush=True)
    del model, graphdef, state
  return 0


if __name__ == "__main__":
  sys.exit(main())
