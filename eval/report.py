"""Writing benchmark/eval results: JSON + markdown table, atomically."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from palu_jax.checkpoint import atomic_write_text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def write_results(out_dir: str, name: str, payload: dict[str, Any],
                  markdown: str) -> tuple[str, str]:
  """Writes <out_dir>/<name>.json and .md; returns both paths."""
  os.makedirs(out_dir, exist_ok=True)
  jpath = os.path.join(out_dir, name + ".json")
  mpath = os.path.join(out_dir, name + ".md")
  atomic_write_text(jpath, json.dumps(payload, indent=1) + "\n")
  atomic_write_text(mpath, markdown)
  return jpath, mpath
