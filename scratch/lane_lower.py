import functools, sys, dataclasses
import jax, jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import pallas_kernels.latent_attention.mosaic_gpu as mg
orig = plgpu.kernel
def lane_kernel(*a, compiler_params=None, **k):
  cp = compiler_params or plgpu.CompilerParams()
  cp = dataclasses.replace(cp, lowering_semantics=plgpu.LoweringSemantics.Lane)
  return orig(*a, compiler_params=cp, **k)
mg.plgpu.kernel = lane_kernel
sys.path.insert(0, "tests"); sys.path.insert(0, "tests/kernel_tests")
from test_mosaic_gpu import _lower
from pallas_kernels.common import LatentSpec
for rope in (False, True):
  for bits in (16, 8):
    spec = LatentSpec(groups=8, kv_per_group=4, q_per_kv=1, head_dim=128, k_rank=256, v_rank=256, bits=bits, quant_group=256 if bits == 8 else 32)
    try:
      t = _lower(spec, 2, 4096, rope).as_text(); print(rope, bits, "ok", "mosaic_gpu" in t)
    except Exception as e:
      print(rope, bits, "FAIL", type(e).__name__, str(e)[:300])
