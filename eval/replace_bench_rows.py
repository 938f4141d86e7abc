"""Replace some variants' rows of bench_kernels results by a later call's.

  python -m eval.replace_bench_rows eval/results/bench_kernels_h200.json \\
      eval/results/bench_kernels_h200_fp8_v31.json \\
      --variants palu50_rope_fp8 palu50_norope_fp8 --note "..."

Each row of the later call for a named variant replaces the row of the same
(shape, batch, context, variant) in place, or is added after the others
where the file has none. Every row keeps the rates and the speedup of the
call that timed it (a speedup is over the baseline timed in that same
call), so a table re-timed in parts stays honest. The file, its markdown
table and its plot are rewritten atomically; on an error nothing is
written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eval.bench_kernels import TABLE_COLUMNS
from eval.plots import plot_results
from eval.report import markdown_table, write_results


def _key(row: dict) -> tuple:
  return (row.get("shape"), row.get("batch"), row.get("context"),
          row.get("variant"))


def replace_rows(rows: list[dict], later: list[dict],
                 variants: set[str]) -> list[dict]:
  """rows with the rows of `later` whose variant is in `variants` put in
  place of theirs (same shape, batch, context and variant; added at the
  end where rows has none). ValueError if `later` has no row of a named
  variant (a misspelt name would otherwise change nothing)."""
  missing = variants - {r.get("variant") for r in later}
  if missing:
    raise ValueError(f"the later call has no rows of {sorted(missing)}")
  new = {_key(r): r for r in later if r.get("variant") in variants}
  out = [new.pop(_key(r), r) if r.get("variant") in variants else r
         for r in rows]
  return out + list(new.values())


def _load_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    raise SystemExit(f"{path}: no such results file")
  with open(path) as f:
    rows = json.load(f)
  if not isinstance(rows, list):
    raise SystemExit(f"{path}: expected a list of rows (bench_kernels)")
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("results", help="the bench_kernels JSON to update")
  ap.add_argument("later", help="the later call's bench_kernels JSON")
  ap.add_argument("--variants", nargs="+", required=True,
                  help="the variants whose rows the later call replaces")
  ap.add_argument("--note", default="",
                  help="a sentence for the markdown: which rows came from "
                       "which call")
  args = ap.parse_args(argv)
  rows = _load_rows(args.results)
  later = _load_rows(args.later)
  try:
    out = replace_rows(rows, later, set(args.variants))
  except ValueError as e:
    raise SystemExit(f"{args.later}: {e}") from None
  device = out[0].get("device", "GPU") if out else "GPU"
  md = (f"# Decode attention kernels ({device})\n\n"
        "Rows from several calls, each with its own HBM read and matmul "
        "rates (per row in the JSON). " + (args.note + " " if args.note
                                            else "")
        + "Speedup is over the fastest full-KV baseline of the same shape, "
        "batch and context, timed in the same call.\n\n"
        + markdown_table(out, TABLE_COLUMNS))
  out_dir, name = os.path.split(os.path.splitext(args.results)[0])
  jpath, mpath = write_results(out_dir or ".", name, out, md)
  plot_results(jpath)
  replaced = sum(r.get("variant") in args.variants for r in out)
  print(f"{jpath}: {len(out)} rows ({replaced} from {args.later})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
