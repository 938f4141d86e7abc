"""GPU kernel events of a jax.profiler trace (Chrome trace format)."""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile

import jax


def gpu_kernel_events(trace: dict) -> list[dict]:
  """The complete ("X") events on GPU stream threads of a Chrome trace."""
  pname, tname = {}, {}
  for e in trace.get("traceEvents", []):
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = str(e.get("args", {}).get("name", ""))
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e["tid"])] = str(e.get("args", {}).get("name", ""))
  out = []
  for e in trace.get("traceEvents", []):
    if e.get("ph") != "X" or "dur" not in e:
      continue
    p = pname.get(e.get("pid"), "")
    t = tname.get((e.get("pid"), e.get("tid")), "")
    if "GPU" in p.upper() and "stream" in t.lower():
      out.append(e)
  return out


def busy_us(events: list[dict]) -> float:
  """Length of the union of the events' [ts, ts + dur) intervals (µs)."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]))
                 for e in events)
  total, end = 0.0, float("-inf")
  for a, b in spans:
    if b <= end:
      continue
    total += b - max(a, end)
    end = b
  return total


def traced_gpu_events(run) -> list[dict]:
  """GPU kernel events of one call of `run()` (already compiled) under
  jax.profiler; empty where the trace has no GPU streams (the CPU)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(run())
    [path] = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"),
                       recursive=True)
    with gzip.open(path) as f:
      return gpu_kernel_events(json.load(f))


def span_us(events: list[dict]) -> float:
  """From the first event's start to the last one's end (µs)."""
  return (max(float(e["ts"]) + float(e["dur"]) for e in events)
          - min(float(e["ts"]) for e in events))
