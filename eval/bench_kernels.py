"""Decode-attention kernels against full-KV baselines, one layer at a time.

For each model shape (Llama-2-7B: 32 × 128 MHA; Llama-3-8B: 32 q / 8 kv
heads × 128), batch and context, one decode step of attention is timed for
  full-KV baselines: plain XLA einsum attention on the model's token-major
    cache (`full_xla`), `jax.nn.dot_product_attention` with cuDNN
    (`full_cudnn`) and XLA (`full_dpa_xla`), and JAX's Pallas
    `decode_attention.mqa` on a head-major cache (`full_pallas`);
  ours: Palu G-LRD (groups of 4 KV heads) latents at 30 % / 50 %, with RoPE
    (`paluNN_rope`, keys rebuilt in the kernel) and without
    (`paluNN_norope`, B_k folded into q), 16-bit and int4/3/2 latents;
    other group sizes with `--groups` (variant suffix `_gN`, e.g. M-LRD
    `_g1`, whose B_k stays on chip).
Next to it, in the same run, the HBM read bandwidth (a large reduction) and
the tensor-core throughput (a large bf16 matmul): each row reports µs, GB/s,
TFLOP/s, the fraction of whichever roofline binds it, and the speedup over
the best baseline of its shape.

  python -m eval.bench_kernels [--contexts 4096 16384 65536 131072]
      [--batches 1 8] [--shapes llama2-7b llama3-8b] [--groups 4 1]
      [--out DIR] [--tune]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench_decode import _pseudo_random, measure_bandwidth
from eval.report import markdown_table, write_results
from eval.trace_events import span_us, traced_gpu_events
from eval.plots import plot_results
from pallas_kernels.common import LatentSpec, QuantLatent, rank_unit
from pallas_kernels.latent_attention import mosaic_gpu
from pallas_kernels.latent_attention.api import latent_decode_attention
from pallas_kernels.tuning import choose_config

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128),
          # SmolLM2-135M: 9 q / 3 kv heads x 64; its default compression
          # is one shared latent for all 3 KV heads (--groups 3 --shared)
          "smollm2-135m": (9, 3, 64)}
GROUP = 4           # KV heads per latent group (G-LRD)
DTYPE = jnp.bfloat16
BASELINES = ("full_xla", "full_dpa_xla", "full_cudnn", "full_pallas")


def time_op(fn, *args, iters: int = 10, repeats: int = 3,
            link: str | None = None) -> float:
  """Seconds per call of fn(*args): `iters` calls chained inside one jitted
  function (each call's output feeds the next query, `_chain`, so none is
  skipped), best of `repeats`. The calls are unrolled, not a `fori_loop`:
  on the GPU each iteration of an XLA while loop adds a fixed cost (~25 µs
  on the H200: cuDNN's dense call on SmolLM2's shape, B16 8K, took 75 µs in
  the loop and 50 µs unrolled), which made small kernels look slow and
  pulled the speedups of small shapes toward 1. The chain's own fixed cost
  (dispatch and the final sync, ~250-400 µs on the H200) is still spread
  over its calls, so rows under ~100 µs read high (NOTES.md, "Timing small
  shapes"; eval/profile_kernel.py --breakdown gives device times). Two
  queued runs minus one was tried and dropped: it gave impossible rates
  for small calls (7.7 TB/s) and ms-scale rows up to 27 % slower than
  single runs (eval/results/bench_kernels_h200_v13_queued_*.md). Either
  way the work that does not depend on the query (B_k regrouped per KV
  head, RoPE tables) is done once for all calls (loop-invariant hoisting
  or CSE), as in a decode loop."""
  run = _chain(fn, iters, link)
  jax.block_until_ready(run(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(*args))
    best = min(best, time.perf_counter() - t)
  return best / iters


def span_op(fn, *args, iters: int = 10, link: str | None = None) -> float:
  """Seconds per call of fn(*args) on the GPU timeline: the same chain as
  `time_op`, traced once by jax.profiler, from its first kernel's start to
  its last one's end, over `iters`: the calls' device time and the gaps
  between their launches, without what the chain pays once (dispatch, the
  final sync). The sound timing of calls under ~100 µs; needs a GPU."""
  run = _chain(fn, iters, link)
  jax.block_until_ready(run(*args))
  events = traced_gpu_events(lambda: run(*args))
  if not events:
    raise RuntimeError("span timing needs GPU kernel events in the trace "
                       f"(backend {jax.default_backend()})")
  return span_us(events) / 1e6 / iters


# How one chained call's output reaches the next call's query. "barrier"
# (the default): through `lax.optimization_barrier`, which launches nothing:
# the next query is an opaque value, so no call is merged or skipped, and
# the span holds the calls and nothing else. "perturb" (before 2026-12-04):
# q + 0·Σout[..., :1], a reduce and an add per call that no decode step
# pays. Measured on the H200 (NOTES.md, "Timing: the chain's link"): the
# latent calls had fused it into their own glue, cuDNN's calls paid it
# (2-5 % of a batch-1 call).
CHAIN_LINKS = ("barrier", "perturb")
CHAIN_LINK = "barrier"


def _chain(fn, iters: int, link: str | None = None):
  """jit of `iters` calls of fn, each call's output feeding the next
  query (`CHAIN_LINK`), so none is skipped or merged."""
  link = link or CHAIN_LINK
  if link not in CHAIN_LINKS:
    raise ValueError(f"chain link {link!r}: expected one of {CHAIN_LINKS}")

  def chained(q, *rest):
    outs = []
    for _ in range(iters):
      out = fn(q, *rest)
      if link == "barrier":
        # the outputs are returned, so no call is dead code
        q, out = jax.lax.optimization_barrier((q, out))
        outs.append(out)
      else:
        q = q + (jnp.sum(out[..., :1]) * 0).astype(q.dtype)
    return q, outs
  return jax.jit(chained)


def measure_matmul_tflops(n: int = 8192, repeats: int = 10,
                          dtype=DTYPE) -> float:
  """TFLOP/s of an n×n×n matmul in `dtype` (f32 accumulation; float8
  e4m3 gives the fp8 tensor rate, which the fp8 rows' rebuild runs at)."""
  a = _pseudo_random(jnp.float32(1), shape=(n, n), dtype=jnp.float32)
  a = (a * 4).astype(dtype)
  f = jax.jit(lambda x: jnp.dot(x, x.T, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e12


# ------------------------------------------------------------------ baselines

def _full_xla(q, k, v, lengths):
  """q [B, N, H]; k, v [B, S, K, H] (token-major, as the model caches)."""
  b, n, h = q.shape
  kh = k.shape[2]
  s = jnp.einsum("BKGH,BSKH->BKGS", q.reshape(b, kh, n // kh, h), k,
                 preferred_element_type=jnp.float32) / math.sqrt(h)
  valid = jnp.arange(k.shape[1])[None, None, None, :] < lengths[:, None,
                                                                None, None]
  p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
  out = jnp.einsum("BKGS,BSKH->BKGH", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, n, h)


def _full_dpa(implementation):
  def f(q, k, v, lengths):
    out = jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=lengths,
        implementation=implementation)
    return out[:, 0]
  return f


def _full_pallas(k_splits):
  from jax.experimental.pallas.ops.gpu import decode_attention as da

  def f(q, k, v, lengths):
    """k, v head-major [B, K, S, H] (no per-call transpose)."""
    b, n, h = q.shape
    kh = k.shape[1]
    qr = q.reshape(b, kh, n // kh, h)
    per_head = jax.vmap(functools.partial(da.mqa, k_splits=k_splits),
                        in_axes=(1, 1, 1, None, None), out_axes=1)
    out = per_head(qr, k, v, None, lengths)
    return out.reshape(b, n, h)
  return f


# ---------------------------------------------------------------------- palu

def palu_spec(n_heads, n_kv, head_dim, ratio, bits, group=GROUP,
              shared: bool = False) -> LatentSpec:
  """G-LRD latents keeping 1 - ratio of each group's key/value dims, the
  rank rounded to the nearest multiple the kernel takes at `bits` (the
  bytes reported are those of the rounded rank). shared: one latent of
  twice the rank serves keys and values (the same bytes per token).
  float8 latents come with an e4m3 B_k (`--k-up-bits 8`), the form the
  Mosaic GPU kernel's fp8 key rebuild takes."""
  spec = LatentSpec(groups=n_kv // group, kv_per_group=group,
                    q_per_kv=n_heads // n_kv, head_dim=head_dim, k_rank=16,
                    v_rank=16, bits=bits, shared=shared,
                    k_up_bits=8 if bits == 8 else 16)
  unit = rank_unit(spec)
  width = (2 if shared else 1) * group * head_dim
  rank = max(unit, int(round((1 - ratio) * width / unit)) * unit)
  return dataclasses.replace(spec, k_rank=rank, v_rank=rank)


def variant_name(ratio: float, rope: bool, bits: int, group: int, *,
                 shared: bool = False, per_token: bool = False) -> str:
  """A row's variant, e.g. palu50_rope (G-LRD-4, 16 bits),
  palu50_norope_int4_g2_qtoken: the bits unless 16, the group unless
  GROUP, _shared for one latent of keys and values, _qtoken for one
  integer scale per token and latent group."""
  return (f"palu{round(ratio * 100)}_{'rope' if rope else 'norope'}"
          + {16: "", 8: "_fp8"}.get(bits, f"_int{bits}")
          + ("" if group == GROUP else f"_g{group}")
          + ("_shared" if shared else "")
          + ("_qtoken" if per_token else ""))


def _latent_side(spec, batch, ctx, seed):
  width = spec.groups * spec.k_rank
  if spec.bits == 16:
    return _pseudo_random(jnp.float32(seed), shape=(batch, ctx, width),
                          dtype=DTYPE)
  groups = width // spec.quant_group
  if spec.bits == 8:             # float8 e4m3 codes, a pow2 scale per group
    codes = _pseudo_random(jnp.float32(seed), shape=(batch, ctx, width),
                           dtype=jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jnp.full((batch, ctx, groups), 0.0625, DTYPE)
    return QuantLatent(codes, scale, jnp.zeros((batch, ctx, 0), DTYPE))
  nbytes = spec.bits * -(-width // 8)
  codes = (_pseudo_random(jnp.float32(seed), shape=(batch, ctx, nbytes),
                          dtype=jnp.float32) * 2550 + 128).astype(jnp.uint8)
  scale = jnp.full((batch, ctx, groups), 0.01, DTYPE)
  offset = jnp.full((batch, ctx, groups), -0.05, DTYPE)
  return QuantLatent(codes, scale, offset)


def palu_flops(spec: LatentSpec, batch: int, ctx: int, rope: bool) -> float:
  per_pos = 2 * spec.n_heads * (spec.head_dim if rope else spec.k_rank)
  per_pos += 2 * spec.n_heads * spec.v_rank                 # p · h_v
  if rope:
    per_pos += 2 * spec.groups * spec.k_rank * spec.kv_per_group * \
        spec.head_dim                                       # K = h · B_k
  return float(batch * ctx * per_pos)


def _time_spec(shape_rows, spec, scales, batch, ctx, q, lengths, paths,
               ratio, group, shared, backends, fallback, timer, configs_for):
  """Time one latent spec on each path and backend (the fallback only where
  no backend of the list takes it); rows appended to shape_rows.
  configs_for(backend, spec, rope): the launch configs to time."""
  h, bits = spec.head_dim, spec.bits
  hk = _latent_side(spec, batch, ctx, 6)
  hv = None if shared else _latent_side(spec, batch, ctx, 7)
  k_up = _pseudo_random(jnp.float32(8), shape=(
      spec.groups * spec.k_rank, group * h), dtype=DTYPE)
  inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, h, 2) / h), jnp.float32)
  nbytes = batch * ctx * spec.latent_bytes_per_token()
  ropes = [p == "rope" for p in ("rope", "norope") if p in paths]
  for rope in ropes:
    name = variant_name(ratio, rope, bits, group, shared=shared,
                        per_token=scales == "token")
    timed = []
    for backend in backends + ((fallback,) if fallback else ()):
      if backend == fallback and timed:
        break                          # a backend of the list took it
      configs = configs_for(backend, spec, rope)
      row = _time_configs(name, backend, configs, spec, batch, ctx, rope, q,
                          (hk, hv, k_up), lengths, nbytes, inv, group, timer)
      if row is not None:              # None: no config for the shape
        timed.append(row)
    shape_rows += timed


def run(shapes, batches, contexts, ratios, bits_list, *, tune: bool,
        save, groups=(GROUP,), backends=("mosaic_gpu", "triton"),
        shared: bool = False, rope_modes: tuple = (),
        compute_wgs: tuple = (), split_counts: tuple = (),
        kv_heads_per_cta: tuple = (), fp8_latents: bool = False,
        turns: bool = False, baselines=("xla", "dpa_xla", "cudnn", "pallas"),
        timer=None, also: tuple = (), paths=("rope", "norope"),
        low_bit_groups: tuple | None = None, fallback: str | None = None,
        int_scales: tuple = ("group",)) -> list[dict]:
  """Time every baseline and Palu variant; `low_bit_groups`: the group
  sizes of bits < 16 (None: `groups`); `fallback`: a backend timed for a
  variant only when none of `backends` takes its shape; `int_scales`:
  integer codes with a scale per 32 latents ("group", the library's
  default) and/or one per token and latent group ("token", rows named
  `..._qtoken`)."""
  timer = timer or time_op
  rows: list[dict] = []
  for shape_name in shapes:
    n_heads, n_kv, h = SHAPES[shape_name]
    for batch in batches:
      for ctx in contexts:
        shape_rows = []
        lengths = jnp.full((batch,), ctx, jnp.int32)
        q = _pseudo_random(jnp.float32(3), shape=(batch, n_heads, h),
                           dtype=DTYPE)
        full_bytes = 2 * batch * ctx * n_kv * h * 2

        def configs_for(backend, spec, rope, batch=batch, ctx=ctx):
          return _configs(backend, spec, batch, ctx, rope, tune, rope_modes,
                          compute_wgs, split_counts, kv_heads_per_cta,
                          fp8_latents, turns, also)
        full_flops = 4.0 * batch * ctx * n_heads * h
        # token-major cache for XLA / cuDNN, head-major for the Pallas op
        k = _pseudo_random(jnp.float32(4), shape=(batch, ctx, n_kv, h),
                           dtype=DTYPE)
        v = _pseudo_random(jnp.float32(5), shape=(batch, ctx, n_kv, h),
                           dtype=DTYPE)
        for name, fn, args in (
            ("full_xla", _full_xla, (k, v)),
            ("full_dpa_xla", _full_dpa("xla"), (k, v)),
            ("full_cudnn", _full_dpa("cudnn"), (k, v))):
          if name[len("full_"):] in baselines:
            shape_rows.append(_measure(name, fn, q, args, lengths,
                                       full_bytes, full_flops, timer))
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        del k, v
        best_pallas = None
        for splits in (16, 64) if "pallas" in baselines else ():
          r = _measure("full_pallas", _full_pallas(splits), q, (kh, vh),
                       lengths, full_bytes, full_flops, timer)
          r["config"] = f"k_splits={splits}"
          if best_pallas is None or (r["us"] or 1e30) < (best_pallas["us"]
                                                        or 1e30):
            best_pallas = r
        if best_pallas is not None:
          shape_rows.append(best_pallas)
        del kh, vh
        for group, ratio, bits in itertools.product(groups, ratios,
                                                    bits_list):
          if n_kv % group or (bits < 16 and low_bit_groups is not None
                              and group not in low_bit_groups):
            continue
          spec = palu_spec(n_heads, n_kv, h, ratio, bits, group, shared)
          if bits == 8 and fp8_latents:   # one scale per token and group
            spec = dataclasses.replace(spec, quant_group=spec.k_rank)
          for scales in int_scales if bits < 8 else ("group",):
            timed_spec = (dataclasses.replace(spec, quant_group=spec.k_rank)
                          if scales == "token" else spec)
            _time_spec(shape_rows, timed_spec, scales, batch, ctx, q, lengths,
                       paths, ratio, group, shared, backends, fallback, timer,
                       configs_for)
        for r in shape_rows:
          r.update(shape=shape_name, batch=batch, kv_heads=n_kv, context=ctx)
        base = [r["us"] for r in shape_rows
                if r["variant"] in BASELINES and r["us"]]
        for r in shape_rows:
          r["speedup"] = (min(base) / r["us"]) if base and r["us"] else None
        rows += shape_rows
        save(rows)
        for r in shape_rows:
          print(f"{shape_name} B{batch} {ctx:>6} {r['variant']:<22} "
                f"{r.get('backend', ''):<10} {r['us'] or float('nan'):9.1f} us"
                f"  {r['gbps'] or 0:7.0f} GB/s"
                f"  {r['tflops'] or 0:6.1f} TF  x{r['speedup'] or 0:.2f} "
                f"{r.get('config', '')} {r.get('error', '')}", flush=True)
  return rows


def _time_configs(name, backend, configs, spec, batch, ctx, rope, q, args,
                  lengths, nbytes, inv, group, timer) -> dict | None:
  """Each launch config of one variant and backend timed; the fastest
  row (None when the backend has no config for the shape)."""
  best = None
  for cfg in configs:
    fn = functools.partial(_palu_call, spec=spec, inv=inv if rope else None,
                           config=cfg, backend=backend)
    r = _measure(name, fn, q, args, lengths, nbytes,
                 palu_flops(spec, batch, ctx, rope), timer)
    r.update(config=_cfg_str(cfg, spec, rope), rank=spec.k_rank, group=group,
             backend=backend)
    if len(configs) > 1:      # every config timed, in the log
      print(f"  {name} {backend} {r['config']}: {r['us']} us", flush=True)
    if best is None or (r["us"] or 1e30) < (best["us"] or 1e30):
      best = r
  return best


def _palu_call(q, hk, hv, k_up, lengths, *, spec, inv, config, backend):
  return latent_decode_attention(q, hk, hv, k_up, lengths, spec=spec,
                                 inv_freq=inv, implementation=backend,
                                 config=config)


def _configs(backend, spec, batch, ctx, rope, tune, rope_modes=(),
             compute_wgs=(), split_counts=(), kv_heads_per_cta=(),
             fp8_latents=False, turns=False, also=()) -> list:
  """Launch configs to time for one backend (the chosen one first); none
  when the Mosaic GPU kernel cannot take the shape (Triton's row stands).
  `rope_modes`: also time the chosen Mosaic GPU config with each of these
  RoPE scoring modes ("rebuild", "fold"), and the chosen config for each
  count of compute warpgroups in `compute_wgs`, each split count in
  `split_counts` and (RoPE) each count of KV heads per CTA in
  `kv_heads_per_cta` that divides the group's; `turns`: also the chosen
  config with the reductions taking turns on one scratch (v12); `also`:
  the chosen config with each group of (field, value) pairs of
  MosaicConfig replaced."""
  if backend == "xla":            # the jnp reference: nothing to launch
    return [None]
  if backend == "triton":
    base = choose_config(spec, batch=batch, cache_len=ctx, rope=rope)
    return [base] + (_tune_grid(base) if tune else [])
  base = mosaic_gpu.choose_config(spec, batch=batch, cache_len=ctx, rope=rope)
  # the fp8 path reads float8 caches only (16-bit rows keep their path)
  base = dataclasses.replace(base, fp8_latents=fp8_latents and spec.bits == 8)
  if mosaic_gpu.unsupported_reason(spec, DTYPE, ctx, rope, base):
    return []
  out = [base]

  def add(c):                     # once, and only if the kernel takes it
    if c not in out and mosaic_gpu.unsupported_reason(
        spec, DTYPE, ctx, rope, c) is None:
      out.append(c)
  for w in compute_wgs:
    add(mosaic_gpu.choose_config(spec, batch=batch, cache_len=ctx, rope=rope,
                                 compute_wgs=w))
  for mode in rope_modes if rope else ():
    add(dataclasses.replace(base, rope_mode=mode))
  for p in split_counts:
    add(dataclasses.replace(base, splits=p))
  for hc in kv_heads_per_cta if rope else ():
    if spec.kv_per_group % hc == 0:
      add(mosaic_gpu.choose_config(spec, batch=batch, cache_len=ctx,
                                   rope=rope, kv_heads_per_cta=hc))
  if turns:
    add(dataclasses.replace(base, private_reductions=False))
  for fields in also:             # each: fields replaced together
    add(dataclasses.replace(base, **dict(fields)))
  if tune:
    for bs in (64, 128):
      for stages in (2, 4):
        for splits in sorted({max(1, base.splits // 2), base.splits,
                              base.splits * 2}):
          # (the chosen KV heads per CTA and paths kept)
          add(dataclasses.replace(base, block_s=bs, stages=stages,
                                  splits=splits))
  return out


def _config_field(text: str) -> tuple[str, object]:
  """"FIELD=VALUE" -> (field, value) of a MosaicConfig field, the value
  parsed as the field's default is typed (bool: true/false)."""
  field, sep, value = text.partition("=")
  fields = {f.name: f for f in dataclasses.fields(mosaic_gpu.MosaicConfig)}
  if not sep or field not in fields:
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
  kind = type(fields[field].default)
  if kind is bool:
    if value.lower() not in ("true", "false"):
      raise argparse.ArgumentTypeError(f"{field}: true or false, not "
                                       f"{value!r}")
    return field, value.lower() == "true"
  try:
    return field, kind(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"{field}: {e}") from None


def _config_fields(text: str) -> tuple[tuple[str, object], ...]:
  """"F1=V1,F2=V2" -> ((F1, V1), (F2, V2)): MosaicConfig fields replaced
  together (one variant), each parsed as `_config_field`."""
  return tuple(_config_field(part) for part in text.split(","))


def _tune_grid(base):
  out = []
  for bs in (32, 64, 128):
    for warps in (4, 8):
      for stages in (1, 2):
        c = dataclasses.replace(base, block_s=bs, num_warps=warps,
                                num_stages=stages)
        if c != base and c not in out:
          out.append(c)
  return out


def _cfg_str(c, spec=None, rope: bool = True) -> str:
  """A launch config in a few words; Mosaic GPU options are named only
  where they apply to the row's spec (fp8_scores: float8 keys without
  RoPE; fused: several RoPE heads per CTA)."""
  if c is None:
    return ""
  if isinstance(c, mosaic_gpu.MosaicConfig):
    applies = lambda f: spec is not None and f(spec, rope, c)
    return (f"bs={c.block_s} P={c.splits} stages={c.stages}"
            + (f" {c.rope_mode}" if c.rope_mode != "rebuild" else "")
            + (f" wgs={c.compute_wgs}" if c.compute_wgs != 2 else "")
            + (f" heads={c.kv_heads_per_cta}" if c.kv_heads_per_cta != 1
               else "")
            + (" fp8_scores" if applies(mosaic_gpu.fp8_scores) else "")
            + ("" if c.private_reductions else " turns")
            + (" int4_steps" if spec is not None and spec.bits == 4
               and not mosaic_gpu.fused_int4(spec, c) else "")
            + (" keys_in_registers" if spec is not None and spec.bits == 4
               and rope and not c.int4_keys_smem else "")
            + (" raw_keys" if applies(mosaic_gpu.raw_int4_keys) else "")
            + (" raw_values" if applies(mosaic_gpu.raw_int4_values) else "")
            + (" scores_together"
               if applies(mosaic_gpu.int4_scores_together) else "")
            + (f" converters={mosaic_gpu.converter_wgs(spec, rope, c)}"
               if applies(mosaic_gpu.int4_converter) else "")
            + (" values_during_scores"
               if applies(mosaic_gpu.values_during_scores) else "")
            + (" fused" if applies(mosaic_gpu.fused_heads) else "")
            + (" rebuild_early" if applies(mosaic_gpu.rebuild_early) else "")
            + ((" int8_rebuild" + ("" if c.int4_int8_keys_smem
                                   else " int8_keys_in_registers"))
               if applies(mosaic_gpu.int8_rebuild) else "")
            + (" fp8_values_masked_per_tile" if spec is not None
               and spec.bits == 8 and not c.fp8_mask_last else "")
            + (" value_halves" if applies(mosaic_gpu.value_halves) else ""))
  return f"bs={c.block_s} P={c.splits} w={c.num_warps} st={c.num_stages}"


def _measure(name, fn, q, args, lengths, nbytes, flops, timer=None) -> dict:
  row = {"variant": name, "bytes": int(nbytes), "us": None, "gbps": None,
         "tflops": None}
  try:
    sec = (timer or time_op)(lambda qq, *a: fn(qq, *a, lengths), q, *args)
  except Exception as e:  # a baseline that cannot run this shape
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row
  row.update(us=sec * 1e6, gbps=nbytes / sec / 1e9, tflops=flops / sec / 1e12)
  return row


def add_roofline(rows: list[dict], read_bps: float, peak_tflops: float,
                 fp8_tflops: float | None = None) -> None:
  """roofline_frac = the larger of GB/s ÷ HBM bandwidth and TFLOP/s ÷ the
  matmul peak (the fp8 matmul rate for float8 rows that run fp8 wgmmas,
  `fp8_tflops`, when measured). The HBM bandwidth is the larger of the
  streaming-sum measurement and the best GB/s any full-KV baseline reached
  in the run (cuDNN reads faster than the XLA sum)."""
  best = max([r["gbps"] * 1e9 for r in rows
              if r["variant"] in BASELINES and r["us"]] + [read_bps])
  for r in rows:
    if r["us"]:
      peak = (fp8_tflops if fp8_tflops and "_fp8" in r["variant"]
              and r.get("backend") == "mosaic_gpu" else peak_tflops)
      hbm, tc = r["gbps"] * 1e9 / best, r["tflops"] / peak
      r["roofline_frac"] = max(hbm, tc)
      r["bound"] = "hbm" if hbm >= tc else "tensor"
      r["hbm_roof_gbps"] = best / 1e9


# the markdown table's columns (eval/replace_bench_rows.py writes the same)
TABLE_COLUMNS = ("shape", "batch", "context", "variant", "backend", "rank",
                 "us", "gbps", "tflops", "roofline_frac", "bound", "speedup",
                 "config")


def rows_of_other_runs(path: str, shapes, batches) -> list[dict]:
  """The rows of a results file that this run does not re-time: those
  whose shape is not in `shapes` or whose batch is not in `batches` (none
  if the file does not exist yet)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a list of rows")
  return [r for r in rows
          if r.get("shape") not in shapes or r.get("batch") not in batches]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
  ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  ap.add_argument("--contexts", nargs="+", type=int,
                  default=[4096, 16384, 65536, 131072])
  ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
  ap.add_argument("--groups", nargs="+", type=int, default=[GROUP],
                  help="KV heads per latent group (4: G-LRD, 1: M-LRD)")
  ap.add_argument("--bits", nargs="+", type=int, default=[16, 8, 4, 3, 2])
  ap.add_argument("--paths", nargs="+", choices=["rope", "norope"],
                  default=["rope", "norope"],
                  help="latent paths to time: keys with RoPE (rebuilt "
                       "from the latents) and without (B_k in the query)")
  ap.add_argument("--backends", nargs="+", default=["mosaic_gpu", "triton"],
                  choices=["mosaic_gpu", "triton", "xla"],
                  help="latent backends to time side by side (xla: the "
                  "jnp reference)")
  ap.add_argument("--shared", action="store_true",
                  help="one latent per group for keys and values (twice "
                  "the rank; variant suffix _shared)")
  ap.add_argument("--tune", action="store_true",
                  help="also sweep block size / warps / stages / splits")
  ap.add_argument("--rope-modes", nargs="+", default=[],
                  choices=["rebuild", "fold"],
                  help="also time the Mosaic GPU RoPE kernel with these "
                  "scoring modes (the fastest row is kept; all are logged)")
  ap.add_argument("--compute-wgs", nargs="+", type=int, default=[],
                  choices=[2, 3], help="also time the Mosaic GPU kernel "
                  "with this many compute warpgroups (fastest row kept)")
  ap.add_argument("--splits", nargs="+", type=int, default=[],
                  help="also time the chosen Mosaic GPU config with each of "
                  "these split counts (fastest row kept; all logged)")
  ap.add_argument("--kv-heads-per-cta", nargs="+", type=int, default=[],
                  help="also time the Mosaic GPU RoPE kernel with one CTA "
                  "for this many KV heads of a group (fastest row kept)")
  ap.add_argument("--fp8-latents", action="store_true",
                  help="float8 rows with one scale per token and latent "
                  "group, read by the Mosaic GPU kernel's fp8 path")
  ap.add_argument("--turns", action="store_true",
                  help="also time the Mosaic GPU kernel with its reductions "
                  "taking turns on one scratch (v12; fastest row kept)")
  ap.add_argument("--also", nargs="+", type=_config_fields, default=[],
                  metavar="FIELD=VALUE[,FIELD=VALUE]",
                  help="also time the chosen Mosaic GPU config with these "
                  "MosaicConfig fields replaced, e.g. fuse_heads=false; "
                  "comma-joined fields form one variant, e.g. "
                  "int4_converter=true,int4_converters=2 (fastest row "
                  "kept; all logged)")
  ap.add_argument("--baselines", nargs="+",
                  default=["xla", "dpa_xla", "cudnn", "pallas"],
                  choices=["xla", "dpa_xla", "cudnn", "pallas"],
                  help="full-KV baselines to time (the fastest one is the "
                  "denominator of every speedup)")
  ap.add_argument("--timing", default="wall", choices=["wall", "span"],
                  help="wall: a chain of calls' wall time over its calls "
                  "(includes the chain's dispatch and sync); span: its GPU "
                  "timeline per call from a jax.profiler trace (small "
                  "calls; needs a GPU)")
  ap.add_argument("--low-bit-groups", nargs="+", type=int, default=None,
                  help="group sizes for bits < 16 (default: --groups)")
  ap.add_argument("--fallback", default=None, choices=["triton", "xla"],
                  help="time this backend for a variant only where none "
                  "of --backends takes the shape (e.g. int4 with RoPE)")
  ap.add_argument("--append", action="store_true",
                  help="keep the rows of other shapes or batches already "
                  "in the results file (one device call per shape or "
                  "batch; each call times its own baselines)")
  ap.add_argument("--int-scales", nargs="+", default=["group"],
                  choices=["group", "token"],
                  help="integer codes: a scale and offset per 32 latents "
                  "(group, the library's default) and/or one per token and "
                  "latent group (token: rows named ..._qtoken)")
  ap.add_argument("--chain-link", default=CHAIN_LINK, choices=CHAIN_LINKS,
                  help="how a chained call's output feeds the next query: "
                  "barrier (no kernel) or perturb (a reduce and an add per "
                  "call: the timing before 2026-12-04)")
  ap.add_argument("--name", default="bench_kernels")
  ap.add_argument("--out", default=os.path.join("eval", "results"))
  args = ap.parse_args(argv)
  bw = measure_bandwidth()["read"]
  peak = measure_matmul_tflops()
  fp8_peak = (measure_matmul_tflops(dtype=jnp.float8_e4m3fn)
              if 8 in args.bits and jax.default_backend() == "gpu" else None)
  meta = {"device": str(jax.devices()[0].device_kind),
          "jax": jax.__version__, "python": platform.python_version(),
          "hbm_read_gbps": bw / 1e9, "matmul_tflops": peak,
          "matmul_fp8_tflops": fp8_peak,
          "group_size": GROUP, "dtype": "bfloat16", "timing": args.timing,
          "chain_link": args.chain_link}
  print(meta, flush=True)
  kept = (rows_of_other_runs(os.path.join(args.out, args.name + ".json"),
                             args.shapes, args.batches)
          if args.append else [])

  def save(rows):
    add_roofline(rows, bw, peak, fp8_peak)
    new = [{**meta, **r} for r in rows]
    fp8 = f", fp8 {fp8_peak:.0f}" if fp8_peak else ""
    md = (f"# Decode attention kernels ({meta['device']})\n\n"
          f"HBM read {bw / 1e9:.0f} GB/s and bf16 matmul {peak:.0f}{fp8} "
          f"TFLOP/s, measured in this run"
          + (" (rows of other shapes or batches kept from an earlier call: "
             "their own rates)" if kept else "")
          + ". Speedup is over the fastest full-KV baseline of the same "
          "shape, batch and context, timed in the same call.\n\n"
          + markdown_table(kept + new, TABLE_COLUMNS))
    jpath, _ = write_results(args.out, args.name, kept + new, md)
    plot_results(jpath)          # a PNG next to it, with matplotlib

  run(args.shapes, args.batches, args.contexts, args.ratios, args.bits,
      tune=args.tune, save=save, groups=args.groups,
      backends=tuple(args.backends), shared=args.shared,
      rope_modes=tuple(args.rope_modes), compute_wgs=tuple(args.compute_wgs),
      split_counts=tuple(args.splits),
      kv_heads_per_cta=tuple(args.kv_heads_per_cta),
      fp8_latents=args.fp8_latents, turns=args.turns, paths=args.paths,
      baselines=tuple(args.baselines), also=tuple(args.also),
      low_bit_groups=(tuple(args.low_bit_groups) if args.low_bit_groups
                      else None), fallback=args.fallback,
      int_scales=tuple(args.int_scales),
      timer=functools.partial(span_op if args.timing == "span" else time_op,
                              link=args.chain_link))
  return 0


if __name__ == "__main__":
  sys.exit(main())
