"""The one entry point to the latent decode kernels.

`latent_decode_attention(..., implementation=...)`:
  "pallas": the Pallas (Triton) kernel; in interpret mode off the GPU.
  "xla":    the pure-jnp reference (same signature and result).
  None:     the kernel on a GPU, the reference elsewhere.
A shape or dtype the kernel does not support falls back to the reference and
logs why, once per reason.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import absorb_attention as _absorb
from pallas_kernels import latent_rope_attention as _rope
from pallas_kernels.common import (Array, KernelConfig, LatentSpec,
                                   cache_sides, rank_unit)
from pallas_kernels.tuning import choose_config

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("pallas", "xla", None)
# keys with RoPE? -> (kernel op, its reference)
_OPS = {True: (_rope.latent_rope_attention,
               _rope.latent_rope_attention_reference),
        False: (_absorb.absorb_attention, _absorb.absorb_attention_reference)}


def unsupported_reason(spec: LatentSpec, q: Array, cache_len: int
                       ) -> str | None:
  """Why the kernel cannot run this shape (None if it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return (f"dtype {q.dtype} (the kernel takes bfloat16, float16 or "
            "float32)")
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


@functools.cache
def _log_once(reason: str) -> None:
  log.warning("latent decode attention: falling back to the XLA reference: "
              "%s", reason)


def latent_decode_attention(q: Array, hk, hv, k_up: Array, lengths: Array, *,
                            spec: LatentSpec, inv_freq: Array | None,
                            k_bias: Array | None = None,
                            implementation: str | None = None,
                            config: KernelConfig | None = None) -> Array:
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
    implementation: "pallas", "xla" or None (see the module docstring).
    config: kernel launch parameters; None picks them (`tuning`).

  Returns:
    [B, N, R_v] float32 softmax-weighted value latents per query head.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  on_gpu = jax.default_backend() == "gpu"
  if implementation is None:
    implementation = "pallas" if on_gpu else "xla"
  rope = inv_freq is not None
  op, reference = _OPS[rope]
  cache_len = cache_sides(hk, hv, spec)[0][0].shape[1]
  if implementation == "pallas":
    reason = unsupported_reason(spec, q, cache_len)
    if reason is not None:
      _log_once(reason)
      implementation = "xla"
  if implementation == "xla":
    return reference(q, hk, hv, k_up, lengths, spec=spec, inv_freq=inv_freq,
                     k_bias=k_bias)
  if config is None:
    config = choose_config(spec, batch=q.shape[0], cache_len=cache_len,
                           rope=rope)
  return op(q, hk, hv, k_up, lengths, spec=spec, inv_freq=inv_freq,
            k_bias=k_bias, config=config, interpret=not on_gpu)
