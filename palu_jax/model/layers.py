"""Building blocks: RMSNorm, RoPE, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palu_jax.config import ModelConfig
from palu_jax.typing import Array


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, returned in the input dtype."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.bfloat16):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[H/2] float32 inverse frequencies, with llama3 scaling when configured."""
  h = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) **
                (np.arange(0, h, 2, dtype=np.float32) / np.float32(h))))
  s = cfg.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  old = s.original_max_position_embeddings
  low_wavelen = old / s.low_freq_factor
  high_wavelen = old / s.high_freq_factor
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (old / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """positions [B, T] -> cos, sin [B, T, H] (rotate-half layout), float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, T, heads, H]; cos/sin [B, T, H]. Rotate-half RoPE in float32."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def linear(din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs,
           axes: tuple[str | None, str | None] = (None, None)):
  """A [din, dout] projection computed and stored in `dtype`; `axes` are
  the logical axes of its two dimensions (palu_jax.sharding.mesh.RULES),
  kept as the parameters' `logical_axes` metadata."""
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
      kernel_init=nnx.with_metadata(nnx.initializers.normal(din ** -0.5),
                                    logical_axes=tuple(axes)),
      bias_init=nnx.with_metadata(nnx.initializers.zeros_init(),
                                  logical_axes=(axes[1],)),
      rngs=rngs)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.gate_proj = linear(cfg.dim, cfg.hidden_dim, bias=False, dtype=dtype,
                            rngs=rngs, axes=("embed", "mlp"))
    self.up_proj = linear(cfg.dim, cfg.hidden_dim, bias=False, dtype=dtype,
                          rngs=rngs, axes=("embed", "mlp"))
    self.down_proj = linear(cfg.hidden_dim, cfg.dim, bias=False, dtype=dtype,
                            rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# A weight at least this large (elements) is read faster by a GEMM than by
# the multiply + reduce XLA would turn a one-row product into.
_GEMV_PAD_ELEMENTS = 1 << 20


def project(x: Array, w: Array, *, out_dtype=None) -> Array:
  """x [..., K] @ w [K, N] -> [..., N] (in out_dtype, default x's dtype).

  With one row (batch-1 decode) XLA:GPU rewrites a vector-matrix product
  whose (1 + N)·K is below 10M elements into multiply + reduce (dot
  strength reduction in its algebraic simplifier), which reads the weight
  at ~0.8 TB/s on the H200 where a GEMM reads ~3 TB/s: a Palu layer's
  [4096, 2048] down-projections and its folded output projection took
  2.1 ms of a 14 ms Llama-2-7B step that way
  (eval/results/profile_decode_h200.md). A zero second row, behind an
  optimization barrier so that it is not simplified away, keeps the
  product a matrix product; it costs no extra weight traffic.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, k)
  pad = rows.shape[0] == 1 and w.size >= _GEMV_PAD_ELEMENTS
  if pad:
    rows = jax.lax.optimization_barrier(
        jnp.concatenate([rows, jnp.zeros_like(rows)], axis=0))
  y = jnp.dot(rows, w, preferred_element_type=out_dtype or x.dtype)
  if pad:
    y = y[:1]
  return y.reshape(*lead, w.shape[-1])
