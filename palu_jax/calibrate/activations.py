"""Per-layer Gram matrices XᵀX of the k/v projection inputs.

The k and v projections of a layer share one input: the output of that
layer's attention RMSNorm. Windows stream through the model in jitted
batches and only the [D, D] float32 sums are kept, never the activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from palu_jax.calibrate.windows import as_windows
from palu_jax.errors import PaluError
from palu_jax.typing import Array


def attention_inputs_of(model, windows: Array) -> Array:
  """windows [B, T] -> [L, B, T, D] float32 input of every layer's attention
  (the k/v projections' input), traced: call it under jit."""
  x, cos, sin, q_pos, start = model.prelude(windows)
  out = []
  for layer in model.layers:
    out.append(layer.attn_norm(x).astype(jnp.float32))
    x, _ = layer(x, cos, sin, q_pos, None, start)
  return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _batch_grams(graphdef, state, windows: Array) -> Array:
  """windows [B, T] -> [L, D, D] float32 Σ over B·T of hᵀh per layer."""
  h = attention_inputs_of(nnx.merge(graphdef, state), windows)
  return jnp.einsum("LBTD,LBTE->LDE", h, h,
                    precision=jax.lax.Precision.HIGHEST)


def kv_input_grams(model, windows, *, batch_size: int = 1,
                   progress: bool = True, mesh=None
                   ) -> tuple[np.ndarray, int]:
  """Accumulates XᵀX of each layer's k/v projection input.

  Args:
    model: a palu_jax Transformer.
    windows: [N, T] int token windows.
    mesh: a ("data", "model") mesh: parameters sharded by their logical
      axes, each batch of windows split over "data"; the per-device partial
      sums of a batch are reduced by XLA (batch_size a multiple of the
      "data" size uses every device).

  Returns:
    (grams [L, D, D] float64 on the host, number of tokens seen).
  """
  from palu_jax.sharding.shard import batch_placer, split_for
  windows = as_windows(windows)
  graphdef, state = split_for(model, mesh)
  place = batch_placer(mesh, name="calibration windows")
  total = None
  bar = tqdm(total=len(windows), desc="calibration (XᵀX)", unit="win",
             disable=not progress)
  for i in range(0, len(windows), batch_size):
    batch = windows[i:i + batch_size]
    g = np.asarray(_batch_grams(graphdef, state, place(batch)), np.float64)
    if not np.all(np.isfinite(g)):
      raise PaluError(f"calibration produced NaN/Inf activations in windows "
                      f"{i}..{i + len(batch) - 1}; try --dtype float32")
    total = g if total is None else total + g
    bar.update(len(batch))
  bar.close()
  return total, int(windows.size)
