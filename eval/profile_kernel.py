"""Where the Mosaic GPU latent kernel's cycles go, tile by tile.

Runs `latent_attention` with Mosaic GPU's in-kernel profiler on (the named
stages of each tile: `k_wait`, `rebuild`, `rope`, `score`, `turn`,
`softmax`, `p_store`, `v_wait`, `pv`; the producer's `k_free`/`v_free`
waits), reads the trace it writes, and reports per warpgroup role the mean
SM cycles each stage takes per tile, the cycles between tiles, and the share
of the loop each stage holds. A diagnostic, like eval/probe_mosaic_rope.py;
the profile buffer costs shared memory and a clock read per stage, so the
kernel runs a little slower than unprofiled. Where the buffer for every
tile does not fit next to the ring (long contexts), the kernel records
its first tiles only (`profiled_tiles` in the table). The trace comes back
through a host callback: run with JAX_PLATFORMS=cuda,cpu (or unset).

  python -m eval.profile_kernel [--context 4096] [--batch 8] [--groups 4 2 1]
      [--shape smollm2-135m --shared] [--kv-heads-per-cta 3] [--splits 8]
      [--turns] [--breakdown]

--breakdown also traces the whole jitted call (no in-kernel profiler) with
jax.profiler and reports the device time of each GPU kernel it launches: the
latent kernel next to the XLA work around it (query/B_k preparation, the
split combine), which the benchmarks time together.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench_decode import _pseudo_random
from eval.bench_kernels import (SHAPES, _cfg_str, _chain, _config_field,
                                _latent_side, palu_spec, variant_name)
from eval.trace_events import span_us, traced_gpu_events
from eval.report import markdown_table, write_results
from pallas_kernels.latent_attention import mosaic_gpu as mg

COMPUTE_STAGES = ("k_wait", "rebuild", "rope", "upcast", "convert", "scale",
                  "score", "turn", "softmax", "p_store", "v_wait", "pv")
# the int4 converter WG's (`int4_converter`): ring slot free, value codes
# in, their dequantization and store (c_convert), of which the stores to
# shared memory (c_store, nested)
CONVERTER_STAGES = ("c_free", "c_wait", "c_convert", "c_store")


def stage_cycles(trace: dict) -> dict[str, dict]:
  """Chrome-trace events of the profiler -> per role ("compute", "memory",
  "converter") {stage: [cycles per occurrence]} and "period": cycles
  between successive tile starts (`k_wait` begins) of one compute
  warpgroup. The profiler's timestamps are SM clock cycles / 1e3 within
  one warpgroup's trace."""
  by_tid = collections.defaultdict(list)
  for ev in trace["traceEvents"]:
    by_tid[ev["tid"]].append(ev)
  out = {role: collections.defaultdict(list)
         for role in ("compute", "memory", "converter")}
  for events in by_tid.values():
    names = {e["name"] for e in events}
    role = ("compute" if "k_wait" in names else
            "converter" if "c_convert" in names else "memory")
    open_at: dict[str, float] = {}
    starts = []
    for e in events:
      cyc = e["ts"] * 1e3
      if e["ph"] == "B":
        open_at[e["name"]] = cyc
        if e["name"] == "k_wait":
          starts.append(cyc)
      elif e["name"] in open_at:
        out[role][e["name"]].append(cyc - open_at.pop(e["name"]))
    if role == "compute" and len(starts) > 2:
      out["compute"]["period"].extend(np.diff(starts)[1:].tolist())
  return out


def _inputs(spec, batch: int, context: int):
  """Pseudo-random cache sides, B_k, queries, RoPE frequencies, lengths."""
  hk = _latent_side(spec, batch, context, 6)
  hv = None if spec.shared else _latent_side(spec, batch, context, 7)
  k_up = _pseudo_random(jnp.float32(8), shape=(
      spec.groups * spec.k_rank, spec.kv_per_group * spec.head_dim),
      dtype=jnp.bfloat16)
  q = _pseudo_random(jnp.float32(3), shape=(batch, spec.n_heads,
                                            spec.head_dim), dtype=jnp.bfloat16)
  inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, spec.head_dim, 2)
                                    / spec.head_dim), jnp.float32)
  lengths = jnp.full((batch,), context, jnp.int32)
  return q, hk, hv, k_up, inv, lengths


def _config(spec, *, batch: int, context: int, rope: bool, **overrides):
  """choose_config's pick with the non-None overrides applied."""
  base = mg.choose_config(spec, batch=batch, cache_len=context, rope=rope)
  return dataclasses.replace(
      base, **{k: v for k, v in overrides.items() if v is not None})


def breakdown(spec, *, batch: int, context: int, rope: bool,
              steps: int = 8, **overrides) -> dict:
  """Device µs per call of each GPU kernel the jitted latent_attention
  launches (jax.profiler trace of one jitted function making `steps`
  chained calls, as `time_op` times them), the latent kernel named
  `palu_latent_*`; `other_us` sums the rest; `span_us` is the GPU timeline
  from the first kernel's start to the last one's end per call, so
  span − (kernel + other) is time the GPU waited between launches."""
  q, hk, hv, k_up, inv, lengths = _inputs(spec, batch, context)
  cfg = _config(spec, batch=batch, context=context, rope=rope, **overrides)
  run = _chain(lambda qq: mg.latent_attention(
      qq, hk, hv, k_up, lengths, spec=spec, inv_freq=inv if rope else None,
      config=cfg), steps)
  jax.block_until_ready(run(q))                      # compile outside
  events = traced_gpu_events(lambda: run(q))
  per = collections.defaultdict(float)
  for e in events:
    per[e["name"]] += float(e["dur"]) / steps
  kernel = sum(v for k, v in per.items() if "palu_latent" in k)
  top = sorted(per.items(), key=lambda kv: -kv[1])[:6]
  span = span_us(events) / steps
  return {"config": _cfg_str(cfg, spec, rope),
          "kernel_us": kernel, "other_us": sum(per.values()) - kernel,
          "span_us": span, "launches": len(events) / steps,
          "top": "; ".join(f"{k[:40]} {v:.1f}" for k, v in top)}


# profiler ranges a warpgroup records besides its tiles' stages
_PROFILE_SLACK = 16
# the fewest tiles a profile is worth taking for (periods need three)
MIN_PROFILED_TILES = 4


def profile_space_that_fits(spec, rope: bool, config, tiles: int) -> int:
  """Profiler ranges per warpgroup for `tiles` tiles of every compute
  stage, cut to what shared memory holds next to the kernel's own
  buffers (the kernel then records its first tiles and drops the rest).
  Raises ValueError, naming the bytes, where not even MIN_PROFILED_TILES
  fit."""
  want = len(COMPUTE_STAGES) * tiles + _PROFILE_SLACK
  room = mg.SMEM_BYTES - mg.smem_bytes(spec, rope, config)
  per_range = mg.profile_smem_bytes(spec, rope, dataclasses.replace(
      config, profile_space=1))
  space = min(want, room // per_range)
  floor = len(COMPUTE_STAGES) * MIN_PROFILED_TILES + _PROFILE_SLACK
  if space < min(want, floor):
    raise ValueError(
        f"the profiler's buffers do not fit: the kernel takes "
        f"{mg.smem_bytes(spec, rope, config)} of {mg.SMEM_BYTES} bytes of "
        f"shared memory, {MIN_PROFILED_TILES} profiled tiles need "
        f"{floor * per_range} more (try --stages 2 or --block-s 64)")
  return space


def profile_one(spec, *, batch: int, context: int, rope: bool,
                stages: int | None, rope_mode: str | None = None,
                **overrides) -> dict:
  q, hk, hv, k_up, inv, lengths = _inputs(spec, batch, context)
  base = _config(spec, batch=batch, context=context, rope=rope,
                 rope_mode=rope_mode, **overrides)
  base = dataclasses.replace(base, stages=stages or base.stages)
  tiles = context // base.block_s // base.splits + 1
  space = profile_space_that_fits(spec, rope, base, tiles)
  with tempfile.TemporaryDirectory() as tmp:
    cfg = dataclasses.replace(base, profile_space=space, profile_dir=tmp)
    out = mg.latent_attention(q, hk, hv, k_up, lengths, spec=spec,
                              inv_freq=inv if rope else None, config=cfg)
    jax.block_until_ready(out)
    jax.effects_barrier()
    [path] = glob.glob(os.path.join(tmp, "*"))
    with open(path) as f:
      trace = json.load(f)
  cyc = stage_cycles(trace)
  row = {"stages": cfg.stages, "splits": cfg.splits,
         # the tiles the buffer was sized for (one range per compute
         # stage each; a tile of several sub-tiles or heads records more)
         "profiled_tiles": min(tiles, (space - _PROFILE_SLACK)
                               // len(COMPUTE_STAGES)),
         "rope_mode": cfg.rope_mode, "heads": cfg.kv_heads_per_cta,
         "reductions": "private" if cfg.private_reductions else "turns"}
  comp = cyc["compute"]
  period = float(np.median(comp["period"])) if comp["period"] else None
  row["period_cyc"] = period
  for name in COMPUTE_STAGES:
    if comp.get(name):
      row[name] = float(np.mean(comp[name]))
  for name in ("k_free", "v_free"):
    if cyc["memory"].get(name):
      row[name] = float(np.mean(cyc["memory"][name]))
  for name in CONVERTER_STAGES:
    if cyc["converter"].get(name):
      row[name] = float(np.mean(cyc["converter"][name]))
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=4096)
  ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
  ap.add_argument("--groups", type=int, nargs="+", default=[4, 2, 1])
  ap.add_argument("--stages", type=int, nargs="+", default=[0],
                  help="ring slots to try (0: the kernel's choice)")
  ap.add_argument("--norope", action="store_true",
                  help="also profile the no-RoPE path")
  ap.add_argument("--rope-modes", nargs="+", default=[None],
                  choices=["rebuild", "fold"],
                  help="RoPE scoring modes to profile (default: the chosen)")
  ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
  ap.add_argument("--shared", action="store_true",
                  help="one latent serves keys and values (SmolLM2)")
  ap.add_argument("--kv-heads-per-cta", type=int, default=None)
  ap.add_argument("--splits", type=int, default=None)
  ap.add_argument("--block-s", type=int, default=None, choices=[64, 128, 256],
                  help="rows per tile (default: the kernel's choice; the "
                  "profiler's buffers take shared memory too)")
  ap.add_argument("--turns", action="store_true",
                  help="reductions taking turns on one scratch (v12) "
                  "instead of each WG's own (the default)")
  ap.add_argument("--bits", type=int, default=16, choices=[16, 8, 4],
                  help="latent bits (8: one scale per token and group; 4: "
                  "quant groups of 32, or with --scale-per-token one per "
                  "token and group)")
  ap.add_argument("--scale-per-token", action="store_true",
                  help="4-bit codes with one scale and offset per token and "
                  "latent group (quant_group = the rank)")
  ap.add_argument("--set", nargs="+", type=_config_field, default=[],
                  metavar="FIELD=VALUE",
                  help="MosaicConfig fields over the chosen config, e.g. "
                  "int4_converter=true")
  ap.add_argument("--breakdown", action="store_true",
                  help="also report each GPU kernel's device time per call")
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  ap.add_argument("--name", default="profile_kernel")
  args = ap.parse_args(argv)
  try:
    jax.devices("cpu")
  except RuntimeError:
    ap.error("the in-kernel profiler writes its trace through a host "
             "callback, which needs JAX's CPU platform: run with "
             "JAX_PLATFORMS=cuda,cpu (or leave JAX_PLATFORMS unset)")
  if args.scale_per_token and args.bits != 4:
    ap.error(f"--scale-per-token is for --bits 4 (got --bits {args.bits}; "
             "float8 always has one scale per token)")
  rows = []
  paths = [(g, True) for g in args.groups]
  if args.norope:
    paths.append((args.groups[0], False))
  n_heads, n_kv, head_dim = SHAPES[args.shape]
  overrides = {"kv_heads_per_cta": args.kv_heads_per_cta,
               "splits": args.splits, "block_s": args.block_s,
               "private_reductions": False if args.turns else None,
               **dict(args.set)}
  for group, rope in paths:
    spec = palu_spec(n_heads, n_kv, head_dim, 0.5, args.bits, group,
                     args.shared)
    if args.bits == 8 or args.scale_per_token:
      spec = dataclasses.replace(spec, quant_group=spec.k_rank)
    if not rope:
      overrides["kv_heads_per_cta"] = None
    for batch in args.batches:
      for st, mode in [(st, mode) for st in args.stages
                       for mode in args.rope_modes]:
        row = {"variant": variant_name(0.5, rope, args.bits, group,
                                       shared=args.shared,
                                       per_token=args.scale_per_token),
               "shape": args.shape, "batch": batch, "context": args.context,
               "device": jax.devices()[0].device_kind}
        try:
          row.update(profile_one(spec, batch=batch, context=args.context,
                                 rope=rope, stages=st or None,
                                 rope_mode=mode, **overrides))
          if args.breakdown:
            # the same stage count as the profiled config
            row.update(breakdown(spec, batch=batch, context=args.context,
                                 rope=rope, rope_mode=mode,
                                 stages=st or None, **overrides))
        except Exception as e:  # a variant that does not fit is reported
          row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        print({k: (round(v) if isinstance(v, float) else v)
               for k, v in row.items()}, flush=True)
  cols = ["variant", "shape", "batch", "stages", "splits", "heads",
          "rope_mode", "reductions", "profiled_tiles", "period_cyc",
          *COMPUTE_STAGES, "k_free", "v_free", *CONVERTER_STAGES,
          "kernel_us", "other_us", "span_us", "launches", "note"]
  md = ("# Mosaic GPU latent kernel: SM cycles per tile and stage\n\n"
        f"{args.shape} shape, 50 %, bf16, the in-kernel profiler "
        f"(context {args.context}). Compute stages: mean cycles per tile "
        "of one compute warpgroup; period: cycles between its tile starts "
        "(two warpgroups alternate tiles, so a CTA finishes a tile every "
        "period/2); k_free/v_free: the producer's waits for a free slot.\n\n"
        + markdown_table(rows, cols))
  write_results(args.out, args.name, {"rows": rows}, md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
