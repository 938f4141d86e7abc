"""Probe: int4 codes (packed u8 in HBM) -> bf16 in registers -> wgmma."""
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS, R, NQ, QG = 64, 256, 8, 32
import os
STEPS = os.environ.get("STEPS", "")
SW = int(os.environ.get("SW", "128"))

def tf(sw, bits):
  return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))

def make(variant):
  def kernel(codes_g, sc_g, zc_g, q_g, out_g, *scratch):
    if variant == "union":
      ring, q_s, sc_s, zc_s, bar = scratch
      ring_u8, ring_i4 = ring
    else:
      ring_i4, q_s, sc_s, zc_s, bar = scratch
    wgl = plgpu.Layout.WGMMA
    rowl = plgpu.Layout.WGMMA.reduce(1)
    if variant == "union":
      plgpu.copy_gmem_to_smem(codes_g, ring_u8, bar.at[0])
    else:
      plgpu.copy_gmem_to_smem(codes_g, ring_i4, bar.at[0])
    plgpu.copy_gmem_to_smem(q_g, q_s, bar.at[0])
    plgpu.copy_gmem_to_smem(sc_g, sc_s, bar.at[0])
    plgpu.copy_gmem_to_smem(zc_g, zc_s, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    v = plgpu.load(ring_i4, layout=plgpu.Layout.WGMMA_UPCAST_4X)
    v = plgpu.layout_cast(v, wgl).astype(jnp.bfloat16)
    if "nowhere" not in STEPS: v = jnp.where(v < 0, v + 16, v)
    pieces = []
    for g in range(0 if "noslice" in STEPS else R // QG):
      s = lax.broadcast_in_dim(plgpu.load(sc_s.at[:, g], layout=rowl, optimized=False), (ROWS, QG), [0])
      z = lax.broadcast_in_dim(plgpu.load(zc_s.at[:, g], layout=rowl, optimized=False), (ROWS, QG), [0])
      pieces.append(v[:, g * QG:(g + 1) * QG] * s + z)
    k = v if "noslice" in STEPS else jnp.concatenate(pieces, axis=1)
    def score(ref):
      plgpu.wgmma(ref, k, q_s.T)
      return ref[...]
    out_g[...] = pl.run_scoped(score, plgpu.ACC((ROWS, NQ), jnp.float32))

  def run(codes_u8, sc, zc, q):
    if variant == "union":
      codes_in = codes_u8
      ring = plgpu.RefUnion(plgpu.SMEM((ROWS, R // 2), jnp.uint8, transforms=tf(SW, 8)),
                            plgpu.SMEM((ROWS, R), jnp.int4, transforms=tf(SW, 4)))
    else:
      codes_in = lax.bitcast_convert_type(codes_u8, jnp.int4).reshape(ROWS, R)
      ring = plgpu.SMEM((ROWS, R), jnp.int4, transforms=tf(SW, 4))
    cp = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane) if 'lane' in STEPS else None
    return plgpu.kernel(kernel, compiler_params=cp, out_type=jax.ShapeDtypeStruct((ROWS, NQ), jnp.float32),
        scratch_types=[ring, plgpu.SMEM((NQ, R), jnp.bfloat16, transforms=tf(128, 16)),
                       plgpu.SMEM((ROWS, R // QG), jnp.bfloat16),
                       plgpu.SMEM((ROWS, R // QG), jnp.bfloat16),
                       plgpu.Barrier(num_arrivals=4, num_barriers=1)])(codes_in, sc, zc, q)
  return run

def reference(codes_u8, sc, zc, q):
  c = codes_u8.astype(jnp.int32)
  lo, hi = c & 15, c >> 4
  codes = jnp.stack([lo, hi], -1).reshape(ROWS, R).astype(jnp.float32)
  k = (codes * jnp.repeat(sc.astype(jnp.float32), QG, 1) + jnp.repeat(zc.astype(jnp.float32), QG, 1)).astype(jnp.bfloat16)
  return jnp.dot(k.astype(jnp.float32), q.astype(jnp.float32).T)

if __name__ == "__main__":
  sd = jax.ShapeDtypeStruct
  args = (sd((ROWS, R // 2), jnp.uint8), sd((ROWS, R // QG), jnp.bfloat16),
          sd((ROWS, R // QG), jnp.bfloat16), sd((NQ, R), jnp.bfloat16))
  for variant in sys.argv[1:] or ["union", "hbm"]:
    f = jax.jit(make(variant))
    try:
      if jax.default_backend() == "gpu":
        rng = np.random.default_rng(0)
        a = (jnp.asarray(rng.integers(0, 256, (ROWS, R // 2), dtype=np.uint8)),
             jnp.asarray(rng.uniform(0.01, 0.1, (ROWS, R // QG)), jnp.bfloat16),
             jnp.asarray(rng.uniform(-0.5, 0.5, (ROWS, R // QG)), jnp.bfloat16),
             jnp.asarray(rng.standard_normal((NQ, R)), jnp.bfloat16))
        got, want = f(*a), reference(*a)
        print(variant, "max err", float(jnp.max(jnp.abs(got - want))), "scale", float(jnp.max(jnp.abs(want))))
      else:
        txt = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        print(variant, "lowered", "mosaic_gpu" in txt)
    except Exception as e:
      print(variant, "FAILED", type(e).__name__, str(e)[:1500])
      if os.environ.get("TB"): import traceback; traceback.print_exc()
