"""PNG plots of benchmark results (one per results table).

  python -m eval.plots eval/results/bench_kernels.json [more.json ...]

The benchmark scripts call `plot_results` after each save when matplotlib
is installed; this entry point redraws from the JSON (e.g. on a machine
with matplotlib, after a GPU run on one without). Each PNG is written next
to its JSON, atomically.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections import defaultdict

from palu_jax.checkpoint import atomic_write_bytes


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _png_bytes(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  return buf.getvalue()


def _save(fig, path: str) -> None:
  atomic_write_bytes(path, _png_bytes(fig))


def plot_kernels(rows: list[dict], path: str, plt) -> None:
  """Speedup over the best full-KV baseline vs context, one panel per
  (shape, batch), one line per variant."""
  panels = sorted({(r["shape"], r["batch"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6),
                           squeeze=False, sharey=True)
  for ax, (shape, batch) in zip(axes[0], panels):
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    lines = defaultdict(list)
    for r in rows:
      if (r["shape"], r["batch"]) == (shape, batch) and r.get("speedup"):
        lines[r["variant"]].append((r["context"], r["speedup"]))
    for name, pts in sorted(lines.items()):
      pts.sort()
      style = "--" if name.startswith("full_") else "-"
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
              markersize=3, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{shape}, batch {batch}")
    ax.set_xlabel("context")
  axes[0][0].set_ylabel("speedup vs best full-KV baseline")
  axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
  _save(fig, path)
  plt.close(fig)


def _tokens_per_s_panels(rows: list[dict], path: str, plt, *, x: str,
                         line) -> None:
  """Decode tokens/s vs rows' `x` field (log 2 axis), one panel per batch,
  one line per `line(row)`."""
  batches = sorted({r["batch"] for r in rows}) or [None]
  fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6),
                           squeeze=False)
  for ax, batch in zip(axes[0], batches):
    lines = defaultdict(list)
    for r in rows:
      if r["batch"] == batch and r.get("tokens_per_s"):
        lines[line(r)].append((r[x], r["tokens_per_s"]))
    for name, pts in sorted(lines.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              label=name)
    ax.set_xscale("log", base=2)
    ax.set_title(f"batch {batch}")
    ax.set_xlabel(x)
    ax.set_ylabel("decode tokens/s")
    if lines:
      ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)


def plot_e2e(rows: list[dict], path: str, plt) -> None:
  """Decode tokens/s vs context per variant, one panel per batch."""
  _tokens_per_s_panels(rows, path, plt, x="context",
                       line=lambda r: r["variant"])


def _context_name(c: int) -> str:
  return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def plot_sharded(rows: list[dict], path: str, plt) -> None:
  """bench_sharded: decode tokens/s vs devices (one line per model,
  variant and context, one panel per batch), or compression seconds vs
  devices against linear scaling."""
  meshed = [r for r in rows if r.get("mesh") != "none"]
  if not any("total_s" in r for r in meshed):
    _tokens_per_s_panels(
        meshed, path, plt, x="devices",
        line=lambda r: (f"{r.get('model', '')} {r['variant']} "
                        f"{_context_name(r['context'])}").strip())
    return
  fig, ax = plt.subplots(figsize=(4.5, 3.6))
  pts = sorted((r["devices"], r["total_s"]) for r in meshed
               if r.get("total_s"))
  ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
          label="calibration + decomposition")
  if pts:      # linear scaling from the fewest devices
    ax.plot([p[0] for p in pts], [pts[0][1] * pts[0][0] / p[0] for p in pts],
            "--", color="gray", label="linear")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("devices")
  ax.set_ylabel("seconds")
  ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)


def loss_png(losses) -> bytes | None:
  """A fine-tuning loss curve (per step and a 20-step moving mean) as PNG
  bytes, or None without matplotlib."""
  plt = _pyplot()
  if plt is None:
    return None
  import numpy as np
  losses = np.asarray(losses, np.float64)
  steps = np.arange(1, len(losses) + 1)
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  ax.plot(steps, losses, lw=0.8, alpha=0.5, label="per step")
  w = min(20, len(losses))
  if w > 1:
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1:], smooth, lw=1.6, label=f"mean of {w}")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  png = _png_bytes(fig)
  plt.close(fig)
  return png


def plot_suite(summary: dict, out_dir: str) -> list[str]:
  """The evaluation suite's PNGs (see eval/suite.py): perplexity vs KV
  bytes per token, zero-shot accuracy per task per configuration, and
  needle retrieval per context length. Returns the paths written."""
  plt = _pyplot()
  if plt is None:
    return []
  models, results = summary["models"], summary["results"]
  written = []
  points = [(n, models[n]["kv_bytes_per_token"], results[n])
            for n in models if models.get(n) and n in results]
  ppl = [k for k in ("ppl:wikitext2", "ppl:c4")
         if any(k in r for _, _, r in points)]
  if ppl:
    fig, axes = plt.subplots(1, len(ppl), figsize=(4.5 * len(ppl), 3.6),
                             squeeze=False)
    for ax, key in zip(axes[0], ppl):
      for name, nbytes, r in points:
        if key in r:
          ax.scatter(nbytes, r[key]["value"])
          ax.annotate(name, (nbytes, r[key]["value"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
      ax.set_xlabel("KV cache bytes per token")
      ax.set_ylabel(f"perplexity ({key[4:]})")
    written.append(os.path.join(out_dir, "ppl_vs_kv_bytes.png"))
    _save(fig, written[-1])
    plt.close(fig)
  tasks = [t for t in summary["tasks"] if t.startswith("zeroshot:")]
  names = [n for n in models if any(t in results.get(n, {}) for t in tasks)]
  if tasks and names:
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2, 3.6))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
      vals = [100 * results[name][t]["value"] if t in results[name] else 0
              for t in tasks]
      ax.bar([i + k * width for i in range(len(tasks))], vals, width,
             label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([t[9:] for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    written.append(os.path.join(out_dir, "zeroshot.png"))
    _save(fig, written[-1])
    plt.close(fig)
  needle = [(n, results[n]["needle"]) for n in models
            if "needle" in results.get(n, {})]
  if needle:
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for name, r in needle:
      pts = sorted((int(k), 100 * v["accuracy"])
                   for k, v in r["per_length"].items())
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle retrieved (%)")
    ax.legend(fontsize=7)
    written.append(os.path.join(out_dir, "needle.png"))
    _save(fig, written[-1])
    plt.close(fig)
  return written


def plot_results(json_path: str) -> str | None:
  """Draws the PNG for a results JSON (kind told by its rows); returns its
  path, or None without matplotlib."""
  plt = _pyplot()
  if plt is None:
    return None
  with open(json_path) as f:
    payload = json.load(f)
  rows = payload["rows"] if isinstance(payload, dict) else payload
  rows = [r for r in rows if isinstance(r, dict)]
  png = os.path.splitext(json_path)[0] + ".png"
  if rows and "shape" in rows[0]:
    plot_kernels(rows, png, plt)
  elif rows and "mesh" in rows[0]:
    plot_sharded(rows, png, plt)
  elif rows and "context" in rows[0] and "batch" in rows[0]:
    # bench_e2e (rows that did not fit have no tokens_per_s: empty panels)
    plot_e2e(rows, png, plt)
  else:
    raise ValueError(f"{json_path}: not a bench_kernels, bench_e2e or "
                     "bench_sharded result")
  return png


def main(argv=None) -> int:
  paths = sys.argv[1:] if argv is None else argv
  if not paths:
    print(__doc__)
    return 2
  for p in paths:
    out = plot_results(p)
    print(out or "matplotlib is not installed: pip install matplotlib")
  return 0


if __name__ == "__main__":
  sys.exit(main())
