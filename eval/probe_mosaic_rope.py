"""Where the Mosaic GPU RoPE kernel's time goes: the same kernel timed with
one stage at a time replaced by a no-op (patched module functions), on the
Llama-2-7B G-LRD-4 50 % shape. A diagnostic, like eval/ablate_rope.py.

  python -m eval.probe_mosaic_rope [--context 65536] [--batch 8]
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval.bench_kernels import _latent_side, palu_flops, palu_spec, time_op
from eval.bench_decode import _pseudo_random
from pallas_kernels.latent_attention import mosaic_gpu as mg

VARIANTS = {
    "full": {},
    "no_angle_sum": {"angle_sum": lambda ci, si, c0, z0: (ci, si)},
    "no_rotation": {"rotate_halves": lambda k1, k2, c, s: (k1, k2)},
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=65536)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--groups", type=int, nargs="+", default=[4])
  ap.add_argument("--rotations", nargs="+", default=["float16"],
                  choices=["float16", "float32"])
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                  choices=list(VARIANTS))
  args = ap.parse_args(argv)
  for group in args.groups:
    spec = palu_spec(32, 32, 128, 0.5, 16, group)
    hk = _latent_side(spec, args.batch, args.context, 6)
    hv = _latent_side(spec, args.batch, args.context, 7)
    k_up = _pseudo_random(jnp.float32(8), shape=(
        spec.groups * spec.k_rank, group * 128), dtype=jnp.bfloat16)
    q = _pseudo_random(jnp.float32(3), shape=(args.batch, 32, 128),
                       dtype=jnp.bfloat16)
    inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, 128, 2) / 128),
                      jnp.float32)
    lengths = jnp.full((args.batch,), args.context, jnp.int32)
    flops = palu_flops(spec, args.batch, args.context, True)
    originals = {n: getattr(mg, n) for n in ("angle_sum", "rotate_halves")}
    for name in args.variants:
      patch = VARIANTS[name]
      for k, v in patch.items():
        setattr(mg, k, v)
      mg.latent_attention.clear_cache()   # retrace with the patched stage
      for rot in args.rotations:
        cfg = mg.choose_config(spec, batch=args.batch,
                               cache_len=args.context, rope=True)
        cfg = mg.MosaicConfig(block_s=64, stages=cfg.stages,
                              splits=cfg.splits, rotation_dtype=rot)
        stages = cfg.stages
        if mg.unsupported_reason(spec, jnp.bfloat16, args.context, True,
                                 cfg):
          continue
        fn = functools.partial(mg.latent_attention, spec=spec, inv_freq=inv,
                               config=cfg)
        sec = time_op(lambda qq: fn(qq, hk, hv, k_up, lengths), q)
        print(f"g{group} {name:<14} {rot} stages={stages} P={cfg.splits} "
              f"{sec * 1e6:9.1f} us {flops / sec / 1e12:6.1f} TFLOP/s",
              flush=True)
      for k, v in originals.items():
        setattr(mg, k, v)
  return 0


if __name__ == "__main__":
  sys.exit(main())
