"""Which configuration for which goal: quality next to decode speed.

  python -m eval.config_table [--speed eval/results/bench_e2e_h200_configs.json]
      [--quality eval/results/palu_smollm2.json eval/results/palu_smollm2_fp8.json
       eval/results/palu_smollm2_fp8_full.json]

Joins, per configuration (rank reduction × KV heads per latent × latent
bits), the perplexity measured on SmolLM2-135M (`eval/palu_sweep.py`) with
the end-to-end decode tokens/s measured on the Llama-2-7B shape
(`eval/bench_e2e.py`, batch 1, 64K), and marks the configurations no
other one beats on both axes (lower perplexity, more tokens/s). Writes
<out>/config_table.{json,md,png}.

SmolLM2 has 3 KV heads, so its groupings are "all 3 heads" (its default)
and "per head"; the 7B shape's groups of 4 KV heads stand in for the
former. The presets of `palu-jax compress --preset` are picked from this
table (palu_jax/compression_presets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eval.report import markdown_table, write_results
from palu_jax.checkpoint import atomic_write_bytes

# (label, bench_e2e variant, palu_sweep row, preset). bench_e2e's float8
# variants carry an e4m3 B_k (the Mosaic GPU kernel's fp8 key rebuild
# takes no other), so their speed goes with the e4m3-B_k quality rows; the
# float8 rows with a 16-bit B_k have no speed row (their RoPE calls leave
# the Mosaic GPU kernel)
CONFIGS = (
    ("dense", "base", "base", None),
    ("30 %, head groups, bf16", "palu30", "default-30-bf16", None),
    ("30 %, head groups, fp8", None, "default-30-fp8", None),
    ("30 %, head groups, fp8 + e4m3 B_k", "palu30_fp8", "default-30-fp8-kup8",
     None),
    ("50 %, head groups, bf16", "palu50", "default-50-bf16", "balanced"),
    ("50 %, head groups, fp8", None, "default-50-fp8", None),
    ("50 %, head groups, fp8 + e4m3 B_k", "palu50_fp8", "default-50-fp8-kup8",
     "small"),
    ("50 %, head groups, int4 + Hadamard", "palu50_int4",
     "default-50-int4-hadamard", None),
    ("50 %, 2 heads per latent, bf16", "palu50_g2", None, None),
    ("50 %, per head, bf16", "palu50_g1", "default-50-mlrd", "fast"),
)


def _rows(path: str) -> list[dict]:
  try:
    with open(path) as f:
      payload = json.load(f)
  except FileNotFoundError:
    raise SystemExit(f"config_table: {path} does not exist (run the "
                     "benchmark that writes it first)") from None
  return payload["rows"] if isinstance(payload, dict) else payload


def build_table(speed_rows, quality_rows, *, batch: int = 1,
                context: int = 65536) -> list[dict]:
  """One row per configuration in CONFIGS that has at least one of the
  two measurements; `pareto` marks those no other row beats on both
  perplexity (WikiText-2) and tokens/s."""
  speed = {r["variant"]: r for r in speed_rows
           if r.get("batch") == batch and r.get("context") == context
           and r.get("tokens_per_s")}
  quality = {r["name"]: r for r in quality_rows if "ppl_wikitext2" in r}
  out = []
  for label, variant, row_name, preset in CONFIGS:
    s, q = speed.get(variant), quality.get(row_name)
    if s is None and q is None:
      continue
    out.append({
        "config": label, "variant": variant, "quality_row": row_name,
        "preset": preset,
        "smollm2_kv_bytes_per_token": q and q.get("kv_bytes_per_token"),
        "ppl_wikitext2": q and q.get("ppl_wikitext2"),
        "ppl_c4": q and q.get("ppl_c4"),
        "tokens_per_s": s and s["tokens_per_s"],
        "max_context": s and s.get("max_context"),
        "speedup": s and s.get("speedup")})
  both = [r for r in out if r["ppl_wikitext2"] and r["tokens_per_s"]]
  for r in out:
    r["pareto"] = r in both and not any(
        o["ppl_wikitext2"] <= r["ppl_wikitext2"]
        and o["tokens_per_s"] >= r["tokens_per_s"]
        and (o["ppl_wikitext2"], o["tokens_per_s"])
        != (r["ppl_wikitext2"], r["tokens_per_s"]) for o in both)
  return out


def plot(rows: list[dict]) -> bytes | None:
  """Perplexity vs tokens/s, the front's points filled."""
  from eval.plots import _png_bytes, _pyplot
  plt = _pyplot()
  pts = [r for r in rows if r["ppl_wikitext2"] and r["tokens_per_s"]]
  if plt is None or not pts:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in pts:
    ax.scatter(r["tokens_per_s"], r["ppl_wikitext2"],
               facecolors="C0" if r["pareto"] else "none", edgecolors="C0")
    ax.annotate(r["config"] + (f" [{r['preset']}]" if r["preset"] else ""),
                (r["tokens_per_s"], r["ppl_wikitext2"]), fontsize=7,
                xytext=(4, 3), textcoords="offset points")
  ax.set_xlabel("decode tokens/s, Llama-2-7B shape, batch 1, 64K (H200)")
  ax.set_ylabel("WikiText-2 perplexity, SmolLM2-135M")
  ax.set_title("filled: no other configuration is better on both", fontsize=8)
  data = _png_bytes(fig)
  plt.close(fig)
  return data


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--speed", default=os.path.join(
      "eval", "results", "bench_e2e_h200_configs.json"))
  ap.add_argument("--quality", nargs="+", default=[
      os.path.join("eval", "results", "palu_smollm2.json"),
      os.path.join("eval", "results", "palu_smollm2_fp8.json"),
      # the fp8 rows rerun with the rounding barrier (later files win)
      os.path.join("eval", "results", "palu_smollm2_fp8_full.json")],
      help="palu_sweep results; a later file's row wins over an earlier "
      "one's of the same name")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--context", type=int, default=65536)
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  args = ap.parse_args(argv)
  quality = {}
  for path in args.quality:
    quality.update({r["name"]: r for r in _rows(path) if "name" in r})
  rows = build_table(_rows(args.speed), list(quality.values()),
                     batch=args.batch, context=args.context)
  cols = ["config", "preset", "smollm2_kv_bytes_per_token", "ppl_wikitext2",
          "ppl_c4", "tokens_per_s", "speedup", "max_context", "pareto"]
  md = (f"# Which configuration for which goal\n\nPerplexity: SmolLM2-135M "
        f"({', '.join(args.quality)}); decode: Llama-2-7B shape, batch "
        f"{args.batch}, context {args.context} ({args.speed}); pareto: no "
        "other configuration has both lower perplexity and more tokens/s; "
        "max_context: the longest 7B-shape context whose cache fits on the "
        "device at that batch.\n\n"
        + markdown_table(rows, cols))
  jpath, _ = write_results(args.out, "config_table", {"rows": rows}, md)
  png = plot(rows)
  if png is not None:
    atomic_write_bytes(os.path.splitext(jpath)[0] + ".png", png)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
