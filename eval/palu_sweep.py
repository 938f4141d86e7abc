"""Palu compression sweep: perplexity and cache size of many configurations.

Calibrates once (cached), factorizes once per (group size, whitening), then
compresses at each configuration and measures WikiText-2 and C4 perplexity
next to the dense base model, in one run:

  python -m eval.palu_sweep --model smollm2-135m --out eval/results \\
      [--calib-windows 256 --calib-seqlen 2048] [--only NAME ...] [--limit N]

Results are merged into <out>/<name>.json/.md by row name, so the sweep can
be run in parts (and resumed) and finished rows are kept.

Speed: every configuration has other ranks, hence other shapes; to compile
once, rows are evaluated on a copy whose latents are zero-padded to the full
group width. The padding adds exact zeros to every sum, so the perplexity is
that of the compressed model; `--check-padding` also evaluates the first row
unpadded and records both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.perplexity import perplexity
from eval.report import markdown_table, write_results
from palu_jax.checkpoint import load_source, load_tokenizer_for
from palu_jax.compress import (CalibrationConfig, CompressionConfig,
                               calibrate, compress_params, factorize_model,
                               kv_bytes_per_token)
from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.data import load_text
from palu_jax.decompose import lrd
from palu_jax.errors import ConfigError
from palu_jax.model import from_params
from palu_jax.quantize.kv_baselines import bytes_per_token


def _row(name, **kw):
  return name, kw


# name -> changes from CompressionConfig.palu() (+ 'calib': 'small' for the
# CPU default calibration set instead of the sweep's large one).
ROWS = dict([
    # Palu as published: whitened SVD, Fisher ranks, three modes x ratios.
    *[_row(f"{m}-{int(r * 100)}-fisher-white", mode=m, ratio=r)
      for m in ("jlrd", "glrd", "mlrd") for r in (0.3, 0.5, 0.7)],
    # Uniform vs Fisher; plain vs whitened (50%).
    *[_row(f"{m}-50-uniform-white", mode=m, ratio=0.5, alloc="uniform")
      for m in ("jlrd", "mlrd")],
    _row("jlrd-50-fisher-plain", mode="jlrd", ratio=0.5, whiten="none"),
    _row("mlrd-50-fisher-plain", mode="mlrd", ratio=0.5, whiten="none"),
    # Levers (50%, J-LRD).
    _row("jlrd-50-fisher-white-smallcalib", mode="jlrd", ratio=0.5,
         calib="small"),
    _row("jlrd-50-error-white", mode="jlrd", ratio=0.5, alloc="error"),
    _row("jlrd-50-fisher-attn", mode="jlrd", ratio=0.5, whiten="attention"),
    _row("jlrd-50-error-attn", mode="jlrd", ratio=0.5, alloc="error",
         whiten="attention"),
    _row("jlrd-50-uniform-attn", mode="jlrd", ratio=0.5, alloc="uniform",
         whiten="attention"),
    *[_row(f"jlrd-50-uniform-attn-k{int(f * 100)}", mode="jlrd", ratio=0.5,
           alloc="uniform", whiten="attention", k_fraction=f)
      for f in (0.25, 0.35, 0.45)],
    *[_row(f"jlrd-50-error-attn-k{int(f * 100)}", mode="jlrd", ratio=0.5,
           alloc="error", whiten="attention", k_fraction=f)
      for f in (0.25, 0.35, 0.45)],
    _row("jlrd-50-error-attn-smallcalib", mode="jlrd", ratio=0.5,
         alloc="error", whiten="attention", calib="small"),
    *[_row(f"jlrd-50-{a}-attn-k{int(f * 100)}", mode="jlrd", ratio=0.5,
           alloc=a, whiten="attention", k_fraction=f)
      for a in ("fisher", "fisher-error", "uniform") for f in (0.3, 0.35, 0.4)
      if (a, f) != ("uniform", 0.35)],
    _row("jlrd-50-fisher-white-k35", mode="jlrd", ratio=0.5, k_fraction=0.35),
    _row("mlrd-50-fisher-attn-k35", mode="mlrd", ratio=0.5,
         whiten="attention", k_fraction=0.35),
    *[_row(f"jlrd-{int(r * 100)}-fisher-attn-k35", mode="jlrd", ratio=r,
           whiten="attention", k_fraction=0.35) for r in (0.3, 0.7)],
    # Shared key/value latent (one cache entry serves both).
    *[_row(f"shared-50-{a}-{w}-kw{kw}", mode="jlrd", ratio=0.5, alloc=a,
           whiten=w, shared_kv=True, k_weight=kw)
      for a, w, kw in (("uniform", "input", 1.0), ("uniform", "attention", 1.0),
                       ("uniform", "attention", 0.5), ("uniform", "attention", 2.0),
                       ("fisher", "attention", 1.0), ("error", "attention", 1.0),
                       ("fisher-error", "attention", 1.0),
                       ("fisher", "input", 1.0))],
    _row("shared-50-uniform-attention-kw1.0-smallcalib", mode="jlrd",
         ratio=0.5, alloc="uniform", whiten="attention", shared_kv=True,
         calib="small"),
    _row("shared-50-uniform-attention-kw1.0-mlrd", mode="mlrd", ratio=0.5,
         alloc="uniform", whiten="attention", shared_kv=True),
    *[_row(f"shared-{int(r * 100)}-uniform-attention-kw1.0", mode="jlrd",
           ratio=r, alloc="uniform", whiten="attention", shared_kv=True)
      for r in (0.3, 0.7)],
    # Key metric span x key weight x allocation.
    *[_row(f"shared-50-{a}-attention-kw{kw}-span{sp}", mode="jlrd", ratio=0.5,
           alloc=a, whiten="attention", shared_kv=True, k_weight=kw,
           rope_span=sp)
      for a, kw, sp in (("uniform", 1.0, 512), ("uniform", 2.0, 512),
                        ("uniform", 3.0, 512), ("uniform", 2.0, 128),
                        ("uniform", 2.0, 32), ("error", 2.0, 512),
                        ("fisher-error", 2.0, 512), ("error", 2.0, 128))],
    _row("shared-50-uniform-attention-kw2.0-span512-smallcalib", mode="jlrd",
         ratio=0.5, alloc="uniform", whiten="attention", shared_kv=True,
         k_weight=2.0, rope_span=512, calib="small"),
    # Quantized latents (issue 5), default compression.
    *[_row(f"default-{int(r * 100)}-int{b}{'-hadamard' if h else ''}",
           mode="jlrd", ratio=r, alloc="uniform", whiten="attention",
           shared_kv=True, k_weight=2.0, rope_span=512, calib="small",
           kv_bits=b, hadamard=h, multiple=32)  # ranks fill whole quant groups
      for r in (0.3, 0.5) for b in (4, 3, 2) for h in (False, True)],
    # int4 with one scale and offset per token and latent group
    # (quant_group 0): what an fp8 key rebuild from int4 codes needs (one
    # accumulator per rebuild; NOTES.md v17); the rows above use groups
    # of 32 latents.
    *[_row(f"default-50-int4{'-hadamard' if h else ''}-qtoken", mode="jlrd",
           ratio=0.5, alloc="uniform", whiten="attention", shared_kv=True,
           k_weight=2.0, rope_span=512, calib="small", kv_bits=4,
           quant_group=0, hadamard=h, multiple=32)
      for h in (False, True)],
    # Full-cache quantization baselines (dense model, simulated).
    *[_row(f"{m}-{b}", baseline=(m, b, 32, 128 if m == "kivi" else 0))
      for m, b in (("kivi", 4), ("kivi", 2), ("rtn", 4), ("rtn", 3),
                   ("rtn", 2))],
    _row("jlrd-50-uniform-attn-k35-span512", mode="jlrd", ratio=0.5,
         alloc="uniform", whiten="attention", k_fraction=0.35, rope_span=512),
    *[_row(f"shared-{int(r * 100)}-uniform-attention-kw2.0-span512",
           mode="jlrd", ratio=r, alloc="uniform", whiten="attention",
           shared_kv=True, k_weight=2.0, rope_span=512) for r in (0.3, 0.7)],
    # float8 latents (issue 18), default compression, with and without an
    # e4m3 B_k; the 16-bit rows of the same settings (multiple 32) next to
    # them.
    *[_row(f"default-{int(r * 100)}-{name}", mode="jlrd", ratio=r,
           alloc="uniform", whiten="attention", shared_kv=True, k_weight=2.0,
           rope_span=512, calib="small", kv_bits=b, k_up_bits=kb,
           multiple=32)
      for r in (0.3, 0.5)
      for name, b, kb in (("bf16", 16, 16), ("fp8", 8, 16),
                          ("fp8-kup8", 8, 8))],
    # Group size as a speed knob (issue 17): the default decomposition at
    # 50 % per head grouping (G-LRD takes --group-size).
    *[_row(f"default-50-{m}", mode=m, ratio=0.5, alloc="uniform",
           whiten="attention", shared_kv=True, k_weight=2.0, rope_span=512)
      for m in ("mlrd", "glrd")],
])


def pad_to_full_rank(cfg: ModelConfig, params: dict, palu: PaluConfig
                     ) -> tuple[dict, PaluConfig]:
  """Zero-pads every group's latents to the full group width (same math,
  one shape for all configurations)."""
  width = palu.group_size * cfg.head_dim
  if palu.shared_kv:
    width = min(2 * width, cfg.dim)
  out = dict(params)

  def pad(a, ranks, axis):
    pieces, at = [], 0
    for r in ranks:
      piece = np.zeros(a.shape[:axis] + (width,) + a.shape[axis + 1:], a.dtype)
      idx = (slice(None),) * axis
      piece[idx + (slice(0, r),)] = a[idx + (slice(at, at + r),)]
      pieces.append(piece)
      at += r
    return np.concatenate(pieces, axis)

  for i in range(cfg.n_layers):
    pre = f"layers.{i}.attn."
    k, v = palu.k_ranks[i], palu.v_ranks[i]
    out[pre + "k_down"] = pad(params[pre + "k_down"], k, 1)
    out[pre + "k_up"] = pad(params[pre + "k_up"], k, 0)
    out[pre + "o_latent"] = pad(params[pre + "o_latent"], v, 0)
    if not palu.shared_kv:
      out[pre + "v_down"] = pad(params[pre + "v_down"], v, 1)
  groups = cfg.n_kv_heads // palu.group_size
  full = tuple((width,) * groups for _ in range(cfg.n_layers))
  return out, PaluConfig(group_size=palu.group_size, k_ranks=full,
                         v_ranks=full, shared_kv=palu.shared_kv)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--out", default="eval/results")
  p.add_argument("--name", default=None, help="results file stem")
  p.add_argument("--datasets", nargs="+", default=["wikitext2", "c4"])
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--limit", type=int, default=None, help="windows per dataset")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--calib-dataset", default="wikitext2-calib")
  p.add_argument("--small-calib-windows", type=int, default=32)
  p.add_argument("--small-calib-seqlen", type=int, default=512)
  p.add_argument("--calib-windows", type=int, default=256)
  p.add_argument("--calib-seqlen", type=int, default=2048)
  p.add_argument("--calib-cache", default="/tmp/palu_jax_calib")
  p.add_argument("--only", nargs="*", default=None, help="row names (or "
                 "prefixes) to run; 'base' for the dense model")
  p.add_argument("--multiple", type=int, default=16)
  p.add_argument("--group-size", type=int, default=4, help="G-LRD group")
  p.add_argument("--check-padding", action="store_true")
  p.add_argument("--data-dir", default=None)
  args = p.parse_args(argv)
  name = args.name or f"palu_{os.path.basename(args.model).split('.')[0]}"

  cfg, base, _ = load_source(args.model)
  tok = load_tokenizer_for(args.model)
  dense = from_params(cfg, base, dtype=jnp.float32)
  corpora = {d: tok.encode(load_text(d, data_dir_override=args.data_dir),
                           add_bos=False) for d in args.datasets}
  path = os.path.join(args.out, name + ".json")
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      done = {r["name"]: r for r in json.load(f)["rows"]}

  def wanted(row_name):
    return args.only is None or any(row_name.startswith(o) for o in args.only)

  def evaluate(model):
    return {d: perplexity(model, ids, seqlen=args.seqlen, limit=args.limit,
                          batch_size=args.batch_size, progress=False).perplexity
            for d, ids in corpora.items()}

  def save():
    rows = sorted(done.values(), key=lambda r: order.get(r["name"], 1e9))
    cols = ["name", "mode", "alloc", "whiten", "ratio", "k_fraction",
            "shared_kv", "k_weight", "rope_span", "kv_bits", "quant_group",
            "hadamard", "calib",
            "kv_bytes_per_token", "kept", *[f"ppl_{d}" for d in corpora],
            *[f"delta_{d}" for d in corpora], "compress_s"]
    meta = {"model": args.model, "seqlen": args.seqlen, "limit": args.limit,
            "device": jax.devices()[0].device_kind,
            "calibration": {"large": f"{args.calib_windows}x{args.calib_seqlen}",
                            "small": f"{args.small_calib_windows}x"
                                     f"{args.small_calib_seqlen}"}}
    write_results(args.out, name, {"meta": meta, "rows": rows},
                  f"Model {args.model}, seqlen {args.seqlen}, windows "
                  f"{args.limit or 'all'}, {meta['device']}\n\n"
                  + markdown_table(rows, cols))

  order = {"base": -1, **{n: i for i, n in enumerate(ROWS)}}
  if wanted("base") and "base" not in done:
    t = time.perf_counter()
    ppl = evaluate(dense)
    done["base"] = {"name": "base", "kv_bytes_per_token":
                    kv_bytes_per_token(cfg, None), "kept": 1.0,
                    **{f"ppl_{d}": v for d, v in ppl.items()},
                    "eval_s": time.perf_counter() - t}
    save()
  base_ppl = {d: done["base"][f"ppl_{d}"] for d in corpora} if "base" in done else {}

  def deltas(ppl):
    return {f"delta_{d}": f"{100 * (v / base_ppl[d] - 1):+.1f}%"
            for d, v in ppl.items() if d in base_ppl}

  calibs = {"large": CalibrationConfig(dataset=args.calib_dataset,
                                       windows=args.calib_windows,
                                       seqlen=args.calib_seqlen),
            "small": CalibrationConfig(dataset=args.calib_dataset,
                                       windows=args.small_calib_windows,
                                       seqlen=args.small_calib_seqlen)}
  stats, factor_cache = {}, {}
  for row_name, kw in ROWS.items():
    if not wanted(row_name) or row_name in done:
      continue
    kw = dict(kw)
    if "baseline" in kw:
      method, bits, group, residual = kw["baseline"]
      for layer in dense.layers:
        layer.attn.kv_quant = (method, bits, group, residual)
      t = time.perf_counter()
      ppl = evaluate(dense)
      for layer in dense.layers:
        layer.attn.kv_quant = None
      done[row_name] = {
          "name": row_name, "mode": "dense", "alloc": method,
          "kv_bits": bits, "kv_bytes_per_token": round(bytes_per_token(
              cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, method=method,
              bits=bits, group=group, residual=residual, context=args.seqlen),
              1),
          "kept": None, **{f"ppl_{d}": v for d, v in ppl.items()},
          **deltas(ppl),
          "eval_s": round(time.perf_counter() - t, 1)}
      print(row_name, {d: round(v, 3) for d, v in ppl.items()}, flush=True)
      save()
      continue
    which = kw.pop("calib", "large")
    # Rows name what they change from Palu as published.
    comp = CompressionConfig.palu(**{"multiple": args.multiple,
                                     "group_size": args.group_size, **kw})
    try:
      size = comp.validate(cfg)
    except ConfigError as e:  # e.g. G-LRD group 4 on 3 KV heads
      done[row_name] = {"name": row_name, **kw, "skipped": str(e)}
      print(f"{row_name}: skipped ({e})", flush=True)
      save()
      continue
    if size in (1, cfg.n_kv_heads) and lrd.Mode(comp.mode) is lrd.Mode.GLRD:
      done[row_name] = {"name": row_name, **kw, "skipped":
                        f"G-LRD with group {size} equals "
                        f"{'M' if size == 1 else 'J'}-LRD on {cfg.n_kv_heads} "
                        f"KV heads"}
      save()
      continue
    if which not in stats:
      stats[which] = calibrate(dense, tok, calibs[which],
                               cache_dir=args.calib_cache,
                               data_dir=args.data_dir)
      print(f"calibration {which}: {stats[which].tokens} tokens in "
            f"{stats[which].seconds:.1f}s", flush=True)
    span = comp.rope_span or calibs[which].seqlen
    key = (which, size, comp.whiten, comp.shared_kv, comp.k_weight, span)
    t = time.perf_counter()
    if key not in factor_cache:
      factor_cache[key] = factorize_model(
          cfg, base, stats[which], size, comp.whiten, span,
          shared_kv=comp.shared_kv, k_weight=comp.k_weight)
    try:
      params, palu, report = compress_params(cfg, base, stats[which], comp,
                                             factors=factor_cache[key])
    except ConfigError as e:  # e.g. a ratio below one rank multiple per head
      done[row_name] = {"name": row_name, **kw, "skipped": str(e)}
      print(f"{row_name}: skipped ({e})", flush=True)
      save()
      continue
    if comp.k_up_bits == 8:
      from palu_jax.pipeline import fp8_k_up
      params, palu = fp8_k_up(cfg, params, palu)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    if palu.kv_bits == 16:
      padded, full = pad_to_full_rank(cfg, params, palu)
      ppl = evaluate(from_params(cfg, padded, dtype=jnp.float32, palu=full))
    else:  # zero padding would change the quantization groups' ranges
      ppl = evaluate(from_params(cfg, params, dtype=jnp.float32, palu=palu))
    row = {"name": row_name, "mode": comp.mode, "alloc": comp.alloc,
           "whiten": comp.whiten, "ratio": comp.ratio,
           "k_fraction": comp.k_fraction, "shared_kv": comp.shared_kv,
           "k_weight": comp.k_weight, "rope_span": span,
           "kv_bits": comp.kv_bits, "hadamard": comp.hadamard,
           "quant_group": (comp.cache_quant_group() if comp.kv_bits != 16
                           else None),
           "k_up_bits": comp.k_up_bits,
           "calib": f"{calibs[which].windows}x{calibs[which].seqlen}",
           "kv_bytes_per_token": report["kv_bytes_per_token"],
           "kept": report["kept_fraction"], "k_latents": report["k_latents"],
           "v_latents": report["v_latents"],
           **{f"ppl_{d}": v for d, v in ppl.items()},
           **deltas(ppl),
           "compress_s": round(seconds, 2),
           "eval_s": round(time.perf_counter() - t, 1),
           "ranks": palu.to_dict()}
    if args.check_padding:
      row["ppl_unpadded"] = evaluate(from_params(cfg, params,
                                                 dtype=jnp.float32, palu=palu))
      args.check_padding = False
    done[row_name] = row
    print(row_name, {d: round(v, 3) for d, v in ppl.items()},
          row.get("ppl_unpadded", ""), flush=True)
    save()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
