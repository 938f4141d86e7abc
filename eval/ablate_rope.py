"""Diagnostic: where the RoPE and int4 latent kernels spend their time.

Swaps parts of the RoPE kernel's score function (cos/sin, rounding,
rotation, the score dot) or the int4 dequantization for cheaper stand-ins
and times each variant next to the Pallas full-KV baseline, on a GPU:

  python -m eval.ablate_rope rope     # Llama-2-7B shape, B1 64K and B8 16K
  python -m eval.ablate_rope rope2    # K = h·B_k alone, transposed scores
  python -m eval.ablate_rope gqa      # non-RoPE GQA batch 1: blocks x splits

The stand-ins give wrong attention on purpose: this measures costs only.
Rows go to eval/results/ablate_<part>.json/.md (or $OUT).
"""
import dataclasses, functools, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from eval import bench_kernels as bk
from pallas_kernels import latent_rope_attention as lra, common, _flash_decode
from pallas_kernels.tuning import choose_config
from eval.report import markdown_table, write_results
from jax.experimental import pallas as pl

orig_call = lra._RopeScores.__call__
orig_load = common.load_latent_pieces

def make_call(mode):
  def call(self, state, refs, pieces, pos, g):
    b, inv_freq, resident = state
    q1, q2, b1, b2, bias1, bias2, _ = refs
    if mode == "recur":
      n = pos.shape[0]
      a0 = pos[:1].astype(jnp.float32)[:, None] * inv_freq[None, :]
      c0, s0 = jnp.cos(a0), jnp.sin(a0)
      ai = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0).astype(jnp.float32) * inv_freq[None, :]
      ci, si = jnp.cos(ai), jnp.sin(ai)   # not hoisted here: upper bound on its cost
      cos, sin = c0 * ci - s0 * si, s0 * ci + c0 * si
    elif mode in ("nocos",):
      cos = pos.astype(jnp.float32)[:, None] * 0 + inv_freq[None, :] * 0 + 1
      sin = cos * 0
    else:
      angle = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]
      cos, sin = jnp.cos(angle), jnp.sin(angle)
    def score(h_pieces, bk1, bk2, kb1, kb2, qr1, qr2):
      k1 = k2 = None
      for h, w1, w2 in zip(h_pieces, bk1, bk2):
        p1, p2 = common.dot(h, w1), common.dot(h, w2)
        k1 = p1 if k1 is None else k1 + p1
        k2 = p2 if k2 is None else k2 + p2
      dt = self.dtype
      if mode == "norot":
        r1, r2 = k1.astype(dt), k2.astype(dt)
      else:
        if mode not in ("noround", "nocos_noround"):
          k1 = common.rounded(common.rounded(k1, dt) + kb1[None, :], dt)
          k2 = common.rounded(common.rounded(k2, dt) + kb2[None, :], dt)
        r1 = (k1 * cos - k2 * sin).astype(dt)
        r2 = (k2 * cos + k1 * sin).astype(dt)
      if mode == "recon_only":
        t = (jnp.sum(k1, axis=1) + jnp.sum(k2, axis=1)) * 0.0
        return jnp.zeros((qr1.shape[0], 1), jnp.float32) + t[None, :]
      if mode == "score_t":
        st = (common.dot(r1, qr1, trans_b=True) + common.dot(r2, qr2, trans_b=True))
        return st.T
      return (common.dot(qr1, r1, trans_b=True) + common.dot(qr2, r2, trans_b=True))
    h_pieces = [h for h, _ in pieces]
    if resident is not None:
      scores = sum(score(h_pieces, *head) for head in resident)
    else:
      rows_ = [r for _, r in pieces]
      def head(j, scores):
        return scores + score(h_pieces, [b1[g, j, r, :] for r in rows_],
            [b2[g, j, r, :] for r in rows_], bias1[g, j, :], bias2[g, j, :], q1[b, g, j], q2[b, g, j])
      zero = jnp.zeros((q1.shape[3], pos.shape[0]), jnp.float32)
      scores = jax.lax.fori_loop(0, self.spec.kv_per_group, head, zero)
    return scores * (self.spec.head_dim ** -0.5)
  return call

def noscale_load(side_refs, b, rows, group_col, rank, spec, row_width, block, dtype):
  if spec.bits == 16:
    return orig_load(side_refs, b, rows, group_col, rank, spec, row_width, block, dtype)
  pieces = common.piece_layout(spec, rank)
  codes_ref = side_refs[0]
  per = common.fields_per_byte(spec.bits); width = spec.bits
  out = []
  for k in range(0, len(pieces), per):
    c0, size = pieces[k][0], pieces[k][1] * per
    col = group_col + c0
    v = codes_ref[b, rows, pl.ds(col // per, size // per)].astype(jnp.int32)
    out += [common.codes_as_float((v >> (width * f)) & (2 ** width - 1), dtype) for f in range(per)]
  return out

rows = []
def rec(**kw):
  rows.append(kw)
  print(json.dumps(kw), flush=True)
  cols = ["shape", "batch", "ctx", "group", "bits", "rope", "mode", "us",
          "tflops", "cfg"]
  write_results(os.environ.get("OUT", os.path.join("eval", "results")),
                f"ablate_{sys.argv[1]}", {"rows": rows},
                markdown_table(rows, cols))

def bench(shape, batch, ctx, group, bits, rope, mode, cfg=None, ratio=0.5):
  n_heads, n_kv, h = bk.SHAPES[shape]
  spec = bk.palu_spec(n_heads, n_kv, h, ratio, bits, group)
  q = bk._pseudo_random(jnp.float32(3), shape=(batch, n_heads, h), dtype=bk.DTYPE)
  hk = bk._latent_side(spec, batch, ctx, 6); hv = bk._latent_side(spec, batch, ctx, 7)
  k_up = bk._pseudo_random(jnp.float32(8), shape=(spec.groups * spec.k_rank, group * h), dtype=bk.DTYPE)
  inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, h, 2) / h), jnp.float32)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  cfg = cfg or choose_config(spec, batch=batch, cache_len=ctx, rope=rope)
  lra._RopeScores.__call__ = make_call(mode) if rope else orig_call
  _flash_decode.load_latent_pieces = noscale_load if mode == "noscale" else orig_load
  fn = functools.partial(bk._palu_call, spec=spec, inv=inv if rope else None, config=cfg)
  try:
    sec = bk.time_op(lambda qq, *a: fn(qq, *a, lengths), q, hk, hv, k_up)
    us = sec * 1e6
  except Exception as e:
    us = None; print("ERR", type(e).__name__, str(e)[:300])
  fl = bk.palu_flops(spec, batch, ctx, rope)
  rec(shape=shape, batch=batch, ctx=ctx, group=group, bits=bits, rope=rope, mode=mode,
      us=us, tflops=(fl / us / 1e6 if us else None), cfg=bk._cfg_str(cfg, spec, rope))
  lra._RopeScores.__call__ = orig_call; _flash_decode.load_latent_pieces = orig_load

def baseline(shape, batch, ctx):
  n_heads, n_kv, h = bk.SHAPES[shape]
  q = bk._pseudo_random(jnp.float32(3), shape=(batch, n_heads, h), dtype=bk.DTYPE)
  k = bk._pseudo_random(jnp.float32(4), shape=(batch, n_kv, ctx, h), dtype=bk.DTYPE)
  v = bk._pseudo_random(jnp.float32(5), shape=(batch, n_kv, ctx, h), dtype=bk.DTYPE)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  best = min(bk.time_op(lambda qq, kk, vv: bk._full_pallas(s)(qq, kk, vv, lengths), q, k, v) for s in (16, 64))
  rec(shape=shape, batch=batch, ctx=ctx, mode="full_pallas", us=best * 1e6)

part = sys.argv[1]
if part == "rope":
  for shape, batch, ctx in (("llama2-7b", 1, 65536), ("llama2-7b", 8, 16384)):
    baseline(shape, batch, ctx)
    for group in (4, 1):
      for mode in ("base", "recur", "nocos", "noround", "nocos_noround", "norot"):
        bench(shape, batch, ctx, group, 16, True, mode)
    for mode in ("base", "nocos_noround", "norot", "noscale"):
      bench(shape, batch, ctx, 4, 4, True, mode)
    for mode in ("base", "noscale"):
      bench(shape, batch, ctx, 4, 4, False, mode)
elif part == "rope2":
  for shape, batch, ctx in (("llama2-7b", 1, 65536),):
    n_heads, n_kv, h = bk.SHAPES[shape]
    for group in (4, 1):
      spec = bk.palu_spec(n_heads, n_kv, h, 0.5, 16, group)
      base = choose_config(spec, batch=batch, cache_len=ctx, rope=True)
      for mode in ("base", "recon_only", "score_t"):
        bench(shape, batch, ctx, group, 16, True, mode)
      for bs, w in ((64, 4), (64, 8), (32, 4), (256, 8)):
        bench(shape, batch, ctx, group, 16, True, "base",
              cfg=dataclasses.replace(base, block_s=bs, num_warps=w))
      bench(shape, batch, ctx, group, 16, True, "score_t",
            cfg=dataclasses.replace(base, block_s=64, num_warps=4))
elif part == "gqa":
  for ctx in (65536, 131072):
    baseline("llama3-8b", 1, ctx)
    n_heads, n_kv, h = bk.SHAPES["llama3-8b"]
    spec = bk.palu_spec(n_heads, n_kv, h, 0.5, 16)
    base = choose_config(spec, batch=1, cache_len=ctx, rope=False)
    bench("llama3-8b", 1, ctx, 4, 16, False, "base")
    for bs in (32, 64):
      for splits in (132, 264, 528):
        for warps in (4,):
          bench("llama3-8b", 1, ctx, 4, 16, False, "base",
                cfg=dataclasses.replace(base, block_s=bs, splits=splits, num_warps=warps, num_stages=2))
