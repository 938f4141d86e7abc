"""The one entry point to latent decode attention.

`latent_decode_attention(..., implementation=...)`:
  "mosaic_gpu": the Mosaic GPU kernel (Hopper, compute capability ≥ 9.0).
  "triton":     the Pallas Triton kernel; in interpret mode off the GPU.
  "pallas":     an alias of "triton" (the name before Mosaic GPU existed).
  "xla":        the pure-jnp reference (same signature and result).
  None:         Mosaic GPU on compute capability ≥ 9.0 (the reference
                there for RoPE calls reading under `SMALL_CALL_BYTES` of
                16-bit latents, where it is faster), Triton on other GPUs,
                the reference elsewhere.
A shape, dtype or GPU a backend cannot take falls back to the next one
(Mosaic GPU -> Triton -> reference) and logs why, once per reason.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels.common import (Array, KernelConfig, LatentSpec,
                                   cache_sides, rank_unit)
from pallas_kernels.latent_attention import mosaic_gpu, reference, triton
from pallas_kernels.tuning import choose_config

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("mosaic_gpu", "triton", "pallas", "xla", None)

# implementation=None on Hopper, keys with RoPE: below this many bytes of
# 16-bit latents per call the jnp reference beats the Mosaic GPU kernel,
# whose launch, split combine and query-side work cost more than the read.
# Measured on the H200 by the GPU timeline per call
# (eval/results/bench_kernels_h200_b1_4k_span.md): Llama-3-8B B1 4K (8.4 MB)
# RoPE reference 13.6-16.3 µs vs kernel 17.4-23.9 µs; Llama-2-7B B1 4K
# (33.5 MB) kernel 11.5-31.6 µs vs reference 27.3-79.8 µs in all four paths;
# SmolLM2 B16 8K (50 MB) kernel 39 µs vs 53 µs. Without RoPE the kernel wins
# there too since the absorbed queries are one fusion
# (bench_kernels_h200_absorbed_queries_mul_sum.md: Llama-3-8B B1 4K M-LRD
# 11.5 vs 12.8 µs, G-LRD-4 13.3 vs 14.3 µs; cuDNN full KV 12.2 µs).
SMALL_CALL_BYTES = 16 << 20


def triton_unsupported_reason(spec: LatentSpec, q: Array, cache_len: int
                              ) -> str | None:
  """Why the Triton kernel cannot run this shape (None if it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return (f"dtype {q.dtype} (the kernel takes bfloat16, float16 or "
            "float32)")
  cc = compute_capability()
  if spec.bits == 8 and cc is not None and cc < 8.9:
    return (f"float8 latents on compute capability {cc} (Triton converts "
            "e4m3 from 8.9 on)")
  h = spec.head_dim
  if h % 16 or h > 256:
    return f"head_dim {h} (needs a multiple of 16 up to 256)"
  if spec.bits != 16 and spec.quant_group & (spec.quant_group - 1):
    return f"quant_group {spec.quant_group} (needs a power of two)"
  unit = rank_unit(spec)
  for name in ("k_rank", "v_rank"):
    r = getattr(spec, name)
    if r % unit or r == 0:
      return (f"{name} {r} (needs a positive multiple of {unit} at "
              f"{spec.bits} bits)")
  if cache_len % 16:
    return f"cache length {cache_len} (needs a multiple of 16)"
  return None


def compute_capability() -> float | None:
  """The default device's compute capability (None off NVIDIA GPUs)."""
  if jax.default_backend() != "gpu":
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(cc)
  except (TypeError, ValueError):
    return None


@functools.cache
def _log_once(backend: str, reason: str, fallback: str) -> None:
  log.warning("latent decode attention: %s cannot run %s; using %s",
              backend, reason, fallback)


def _check_name(implementation: str | None) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")


def resolve(implementation: str | None, spec: LatentSpec, q: Array,
            cache_len: int, rope: bool,
            mosaic_config: mosaic_gpu.MosaicConfig | None = None) -> str:
  """The backend that will run: the one asked for, or the first fallback
  that can take this shape ("mosaic_gpu", "triton" or "xla")."""
  _check_name(implementation)
  if implementation == "pallas":
    implementation = "triton"
  cc = compute_capability()
  if implementation is None:
    if jax.default_backend() != "gpu":
      return "xla"
    hopper = cc is not None and cc >= 9.0
    if hopper and rope and spec.bits == 16 and (
        q.shape[0] * cache_len * spec.latent_bytes_per_token()
        < SMALL_CALL_BYTES):
      return "xla"
    implementation = "mosaic_gpu" if hopper else "triton"
  if implementation == "mosaic_gpu":
    if cc is None or cc < 9.0:
      reason = f"on {jax.default_backend()} (needs an sm_90+ GPU)"
    else:
      config = mosaic_config or mosaic_gpu.choose_config(
          spec, batch=q.shape[0], cache_len=cache_len, rope=rope)
      reason = mosaic_gpu.unsupported_reason(spec, q.dtype, cache_len, rope,
                                             config)
    if reason is None:
      return "mosaic_gpu"
    fallback = "triton" if jax.default_backend() == "gpu" else "xla"
    _log_once("mosaic_gpu", reason, fallback)
    implementation = fallback
  if implementation == "triton":
    reason = triton_unsupported_reason(spec, q, cache_len)
    if reason is None:
      return "triton"
    _log_once("triton", reason, "xla")
  return "xla"


def latent_decode_attention(q: Array, hk, hv, k_up: Array, lengths: Array, *,
                            spec: LatentSpec, inv_freq: Array | None,
                            k_bias: Array | None = None,
                            implementation: str | None = None,
                            config=None) -> Array:
  """Attention of one new token per sequence over a (quantized) latent cache.

  Args:
    q: [B, N, H] queries of the new token, rotated when `inv_freq` is given.
    hk / hv: latent cache sides, [B, S, G·R] arrays or `QuantLatent`s; hv is
      None with a shared latent.
    k_up: [G·R_k, J·H] key up-projection; k_bias [G·J·H] or None.
    lengths: [B] valid cache rows of each sequence.
    spec: static shapes (`LatentSpec`).
    inv_freq: [H/2] RoPE frequencies, or None for keys without RoPE (then
      B_k is folded into the query).
    implementation: see the module docstring.
    config: launch parameters of the chosen backend (`KernelConfig` for
      Triton, `mosaic_gpu.MosaicConfig` for Mosaic GPU); None picks them.

  Returns:
    [B, N, R_v] float32 softmax-weighted value latents per query head.
  """
  _check_name(implementation)                 # before touching any input
  rope = inv_freq is not None
  cache_len = cache_sides(hk, hv, spec)[0][0].shape[1]
  mosaic_config = config if isinstance(config, mosaic_gpu.MosaicConfig) \
      else None
  backend = resolve(implementation, spec, q, cache_len, rope, mosaic_config)
  if backend == "xla":
    return reference.reference_for(rope)(q, hk, hv, k_up, lengths, spec=spec,
                                         inv_freq=inv_freq, k_bias=k_bias)
  if backend == "mosaic_gpu":
    return mosaic_gpu.latent_attention(q, hk, hv, k_up, lengths, spec=spec,
                                       inv_freq=inv_freq, k_bias=k_bias,
                                       config=mosaic_config)
  if not isinstance(config, KernelConfig):
    config = choose_config(spec, batch=q.shape[0], cache_len=cache_len,
                           rope=rope)
  return triton.op_for(rope)(q, hk, hv, k_up, lengths, spec=spec,
                             inv_freq=inv_freq, k_bias=k_bias, config=config,
                             interpret=jax.default_backend() != "gpu")
