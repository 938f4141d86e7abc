import sys, dataclasses
import jax, jax.numpy as jnp
sys.path.insert(0, "tests"); sys.path.insert(0, "tests/kernel_tests")
import pallas_kernels.latent_attention.mosaic_gpu as mg
from pallas_kernels.common import LatentSpec, QuantLatent
sd = jax.ShapeDtypeStruct
def lower(spec, batch, s, config, dtype=jnp.bfloat16):
  def side(r):
    w = spec.groups * r
    return QuantLatent(sd((batch, s, w // 2), jnp.uint8), sd((batch, s, w // spec.quant_group), dtype), sd((batch, s, w // spec.quant_group), dtype))
  args = (sd((batch, spec.n_heads, spec.head_dim), dtype), side(spec.k_rank), None if spec.shared else side(spec.v_rank),
          sd((spec.groups * spec.k_rank, spec.kv_per_group * spec.head_dim), dtype), sd((batch,), jnp.int32))
  f = lambda q, hk, hv, k_up, lengths: mg.latent_attention(q, hk, hv, k_up, lengths, spec=spec, inv_freq=None, config=config)
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
for (g, j, qk, h, r, shared, batch, s) in [(8, 4, 1, 128, 256, False, 2, 4096), (2, 4, 4, 128, 256, False, 1, 4096), (2, 2, 2, 64, 256, True, 2, 512)]:
  spec = LatentSpec(groups=g, kv_per_group=j, q_per_kv=qk, head_dim=h, k_rank=r, v_rank=r, shared=shared, bits=4, quant_group=32)
  for bs in (None, 64, 128):
    cfg = mg.choose_config(spec, batch=batch, cache_len=s, rope=False)
    if bs: cfg = dataclasses.replace(cfg, block_s=bs, stages=2)
    why = mg.unsupported_reason(spec, jnp.bfloat16, s, False, cfg)
    if why: print(spec.groups, shared, bs, "skip", why); continue
    print("config", cfg, "est", mg.smem_bytes(spec, False, cfg))
    try:
      print(g, j, qk, shared, cfg.block_s, cfg.stages, cfg.splits, "mosaic_gpu" in lower(spec, batch, s, cfg))
    except Exception as e:
      import traceback; traceback.print_exc(); print("FAIL", type(e).__name__, str(e)[:800]); sys.exit(1)
