"""The README's kernel table: speedup per path from a bench_kernels run.

  python -m eval.speedup_table [eval/results/bench_kernels_h200.json]

One row per (shape, batch, context), one column per latent-attention
variant that the file has (RoPE / no RoPE × G-LRD-4, G-LRD-2, M-LRD, then
the float8 and int4 rows); each cell is the row's `speedup` over the
fastest full-KV baseline of the same shape, batch and context, as
`eval/bench_kernels.py` computed it. Printed as markdown, so the README's
table is pasted from a results file instead of typed.
"""

from __future__ import annotations

import argparse
import json
import sys

# (variant, column title), in the README's order
COLUMNS = (
    ("palu50_rope", "RoPE G-LRD-4"),
    ("palu50_rope_g2", "RoPE G-LRD-2"),
    ("palu50_rope_g1", "RoPE M-LRD"),
    ("palu50_norope", "no RoPE G-LRD-4"),
    ("palu50_norope_g2", "no RoPE G-LRD-2"),
    ("palu50_norope_g1", "no RoPE M-LRD"),
    ("palu50_rope_fp8", "fp8 RoPE"),
    ("palu50_norope_fp8", "fp8 no RoPE"),
    ("palu50_rope_int4", "int4 RoPE"),
    ("palu50_norope_int4", "int4 no RoPE"),
    ("palu50_rope_int4_qtoken", "int4/token RoPE"),
    ("palu50_norope_int4_qtoken", "int4/token no RoPE"),
)


def _context(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def speedup_table(rows: list[dict]) -> str:
  """Markdown: a row per (shape, batch, context), a column per variant of
  COLUMNS present in `rows` (cells empty where a point lacks it)."""
  present = {r["variant"] for r in rows}
  cols = [(v, title) for v, title in COLUMNS if v in present]
  if not cols:
    raise ValueError("no latent-attention rows (variants "
                     f"{sorted(present)}; expected some of "
                     f"{[v for v, _ in COLUMNS]})")
  cells: dict[tuple, dict[str, float]] = {}
  for r in rows:
    if r.get("speedup") is None:
      continue
    key = (r["shape"], r["batch"], r["context"])
    cells.setdefault(key, {})[r["variant"]] = r["speedup"]
  lines = ["| shape | batch | context | "
           + " | ".join(title for _, title in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
  for shape, batch, ctx in sorted(cells):
    got = cells[(shape, batch, ctx)]
    lines.append(f"| {shape} | {batch} | {_context(ctx)} | " + " | ".join(
        f"{got[v]:.2f}" if v in got else "" for v, _ in cols) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("results", nargs="?",
                  default="eval/results/bench_kernels_h200.json")
  args = ap.parse_args(argv)
  try:
    with open(args.results) as f:
      rows = json.load(f)
  except FileNotFoundError:
    print(f"error: no results file {args.results}", file=sys.stderr)
    return 2
  if isinstance(rows, dict):
    rows = rows.get("rows", [])
  sys.stdout.write(speedup_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
