"""Fisher information of the k/v projections (for Palu's rank allocation).

Per module m: F_m = mean over its parameters of sqrt(mean over batches of
g²), where g is the gradient of the mean next-token NLL of a batch with
respect to the projection kernel (Palu's rank_search). Gradients are taken
with `jax.grad` for the k/v kernels only.
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
from palu_jax.losses import next_token_nll
from palu_jax.typing import Array


def is_kv_kernel(path, value) -> bool:
  """nnx filter: the kernels of every layer's k_proj and v_proj."""
  return (isinstance(value, nnx.Param) and len(path) >= 2
          and path[-1] == "kernel" and path[-2] in ("k_proj", "v_proj"))


def lm_loss(model, windows: Array) -> Array:
  """Mean next-token NLL over windows [B, T] (float32)."""
  return jnp.mean(next_token_nll(model, windows))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _kv_grads(graphdef, kv_state, rest, windows):
  def loss(kv):
    return lm_loss(nnx.merge(graphdef, kv, rest), windows)
  return jax.grad(loss)(kv_state)


def kv_fisher(model, windows, *, batch_size: int = 1, progress: bool = True,
              mesh=None) -> dict[str, float]:
  """Fisher score per k/v projection.

  Args:
    model: a palu_jax Transformer (its dtype is used for the gradients).
    windows: [N, T] int token windows; each batch of `batch_size` windows is
      one gradient sample.
    mesh: a ("data", "model") mesh: parameters sharded, each batch split
      over "data" (its gradient is reduced across devices by XLA).

  Returns:
    {'layers.{i}.attn.{k,v}_proj': F_m}.
  """
  from palu_jax.sharding.shard import batch_placer, split_for
  windows = as_windows(windows)
  graphdef, kv_state, rest = split_for(model, mesh, is_kv_kernel, ...)
  place = batch_placer(mesh, name="calibration windows")
  sq = None
  batches = 0
  bar = tqdm(total=len(windows), desc="calibration (Fisher)", unit="win",
             disable=not progress)
  for i in range(0, len(windows), batch_size):
    g = _kv_grads(graphdef, kv_state, rest, place(windows[i:i + batch_size]))
    g2 = jax.tree_util.tree_map(lambda a: jnp.square(a.astype(jnp.float32)), g)
    sq = g2 if sq is None else jax.tree_util.tree_map(jnp.add, sq, g2)
    batches += 1
    bar.update(min(batch_size, len(windows) - i))
  bar.close()
  scores = {}
  for path, variable in nnx.to_flat_state(sq):  # path ends in 'kernel'
    f = float(jnp.mean(jnp.sqrt(variable[...] / batches)))
    if not np.isfinite(f):
      raise PaluError(f"Fisher score of {'.'.join(map(str, path))} is not "
                      "finite; the calibration loss diverged")
    scores[".".join(str(p) for p in path[:-1])] = f
  return scores
