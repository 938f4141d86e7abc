"""Which rounding of the absorbed query explains a score error: a diagnostic.

Recomputes the no-RoPE latent attention of the compiled fp8_scores test's
cases in f32 (HIGHEST) from the same e4m3 key and value codes, with the
absorbed query q' = q·B_kᵀ/√H kept exact, rounded to bf16 or f16, split
into e4m3 hi + lo parts (`mosaic_gpu.e4m3_hi_lo`), or hi alone, and prints
each one's largest error against the reference as a fraction of the test's
tolerance and the count of outputs over it. On 2026-12-03 "hi alone"
matched the H200's failures to the count (NOTES.md, "fp8_scores, cause").

  JAX_PLATFORMS=cpu python -m eval.emulate_fp8_scores
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kernel_tests.test_latent_decode import make_inputs  # noqa: E402
from kernel_tests.test_mosaic_gpu import TOL, _fp8_spec  # noqa: E402

from pallas_kernels.absorb_attention import absorbed_queries  # noqa: E402
from pallas_kernels.common import cache_sides  # noqa: E402
from pallas_kernels.latent_attention import mosaic_gpu as mg  # noqa: E402
from pallas_kernels.latent_attention.reference import reference_for  # noqa

# (G, J, Q, H, R, shared, batch, S, lengths): the compiled test's cases
CASES = [(8, 1, 1, 128, 64, False, 2, 1024, [1000, 64]),
         (2, 4, 1, 128, 256, False, 2, 512, [512, 77]),
         (2, 2, 2, 128, 128, False, 3, 448, [448, 1, 200])]


def attention(qf, keys, values, lengths, spec, batch, s):
  """qf [B, G, M, R] · keys [B, S, G, R] -> softmax -> · values: [B, N, R]."""
  sc = jnp.einsum("BGMR,BSGR->BGMS", qf, keys)
  pos = jnp.arange(s)[None, None, None, :]
  sc = jnp.where(pos < lengths[:, None, None, None], sc, -1e30)
  p = jax.nn.softmax(sc, axis=-1)
  out = jnp.einsum("BGMS,BSGR->BGMR", p, values)[:, :, :spec.heads_per_group]
  return np.asarray(out.reshape(batch, spec.n_heads, spec.v_rank))


def main() -> int:
  jax.config.update("jax_default_matmul_precision", "highest")
  for case in CASES:
    g, j, qk, h, r, shared, batch, s, lengths = case
    spec = _fp8_spec(g, j, qk, h, r, shared)
    q, hk, hv, k_up, _, _ = make_inputs(spec, batch, s, jnp.bfloat16, 0)
    lengths = jnp.asarray(lengths, jnp.int32)
    want = np.asarray(reference_for(False)(q, hk, hv, k_up, lengths,
                                           spec=spec, inv_freq=None))
    atol = TOL[jnp.bfloat16] * np.abs(want).max()
    (kc, ks), (vc, vs) = cache_sides(hk, hv, spec)
    side = lambda c, sc: (c.astype(jnp.float32).reshape(batch, s, g, r)
                          * sc.astype(jnp.float32)[..., None])
    keys, values = side(kc, ks), side(vc, vs)
    qf = absorbed_queries(q, k_up, spec, mg.query_cols(spec, False),
                          jnp.float32)
    codes, scale = mg.e4m3_hi_lo(qf)
    parts = codes.astype(jnp.float32) * scale[..., None, None]
    for name, qq in {"exact": qf,
                     "bf16": qf.astype(jnp.bfloat16).astype(jnp.float32),
                     "f16": qf.astype(jnp.float16).astype(jnp.float32),
                     "hi+lo": parts[..., 0, :] + parts[..., 1, :],
                     "hi": parts[..., 0, :]}.items():
      err = np.abs(attention(qq, keys, values, lengths, spec, batch, s)
                   - want)
      print(f"{case[:6]} {name:>6}: max error {err.max() / atol:.2f} x tol, "
            f"{int((err > atol).sum())} outputs over", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
