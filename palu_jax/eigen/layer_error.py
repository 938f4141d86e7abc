"""A layer's attention-output error with its keys and values projected onto
leading eigen-directions, measured on calibration windows.

Projecting every head's key (pre-RoPE) and value onto span(U_r) is the same
as the dense attention with W_k ← W_k·(I_K ⊗ U_r·U_rᵀ) (biases untouched),
which is exactly what the Eigen-compressed model computes; so the dense
`Attention` module is reused with those kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from palu_jax.calibrate.activations import attention_inputs_of
from palu_jax.calibrate.windows import as_windows
from palu_jax.model.layers import rope_cos_sin, rope_inv_freq
from palu_jax.typing import Array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_inputs(graphdef, state, windows: Array) -> Array:
  """windows [B, T] -> [L, B, T, D] float32 inputs of each attention."""
  return attention_inputs_of(nnx.merge(graphdef, state), windows)


def attention_inputs(model, windows, *, batch_size: int = 1,
                     progress: bool = True) -> np.ndarray:
  """[L, N, T, D] float32 (host) input of every layer's attention on the
  windows [N, T], from the dense model."""
  windows = as_windows(windows)
  graphdef, state = nnx.split(model)
  parts = []
  for i in tqdm(range(0, len(windows), batch_size), desc="eigen inputs",
                unit="batch", disable=not progress):
    parts.append(np.asarray(_layer_inputs(
        graphdef, state, jnp.asarray(windows[i:i + batch_size]))))
  return np.concatenate(parts, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _projected_output(graphdef, state, x: Array, pk: Array, pv: Array
                      ) -> Array:
  """Attention output [B, T, D] f32 with heads' keys/values projected by
  pk, pv [H, H]."""
  attn = nnx.merge(graphdef, state)
  dtype = attn.q_proj.kernel[...].dtype
  for proj, p in ((attn.k_proj, pk), (attn.v_proj, pv)):
    w = proj.kernel[...]
    heads = w.reshape(w.shape[0], -1, p.shape[0])
    proj.kernel.set_value(jnp.einsum(
        "DKH,HG->DKG", heads, p.astype(w.dtype),
        precision=jax.lax.Precision.HIGHEST).reshape(w.shape))
  b, t, _ = x.shape
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = rope_cos_sin(q_pos, rope_inv_freq(attn.cfg))
  out, _ = attn(x.astype(dtype), cos, sin, q_pos, None,
                jnp.zeros((b,), jnp.int32))
  return out.astype(jnp.float32)


class LayerError:
  """error(pk, pv) = ‖O(pk, pv) − O‖_F / ‖O‖_F of one layer's attention
  output O over the calibration inputs x [N, T, D]."""

  def __init__(self, attn, x: np.ndarray, *, batch_size: int = 4):
    self._graphdef, self._state = nnx.split(attn)
    self._x = x
    self._batch = batch_size
    eye = np.eye(attn.cfg.head_dim, dtype=np.float32)
    self._ref = [np.asarray(o) for o in self._outputs(eye, eye)]
    self._norm = float(np.sqrt(sum(np.sum(np.square(o, dtype=np.float64))
                                   for o in self._ref)))

  def _outputs(self, pk, pv):
    pk, pv = jnp.asarray(pk, jnp.float32), jnp.asarray(pv, jnp.float32)
    for i in range(0, len(self._x), self._batch):
      yield _projected_output(self._graphdef, self._state,
                              jnp.asarray(self._x[i:i + self._batch]), pk, pv)

  def __call__(self, pk: np.ndarray, pv: np.ndarray) -> float:
    sq = sum(float(jnp.sum(jnp.square(o - r)))
             for o, r in zip(self._outputs(pk, pv), self._ref))
    return float(np.sqrt(sq)) / max(self._norm, 1e-30)
