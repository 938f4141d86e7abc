"""What one device of a mesh holds of a model and its decode cache, from
shapes alone (abstract arrays and shardings: no device needed), and the
longest context that then fits. Used by eval/bench_sharded.py (which skips
rows that would not fit, and plans meshes with `--task plan`) and
eval/bench_e2e.py `--mesh`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from palu_jax.model import Transformer

FIT = 0.92          # of a device's memory limit that a run may fill


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a pytree of abstract arrays placed by a
  matching pytree of shardings (None: all of it on one device)."""
  leaves = jax.tree_util.tree_leaves(abstract)
  if shardings is None:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in leaves)
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(leaves, jax.tree_util.tree_leaves(shardings)))


def footprint(cfg, palu, mesh, dtype=jnp.bfloat16):
  """(per-device weight bytes, f(batch, rows) -> per-device cache bytes)
  of a model in `dtype` on `mesh` (None: one device), from shapes alone."""
  from palu_jax.sharding.shard import cache_shardings, variable_sharding
  abstract = nnx.eval_shape(lambda: Transformer(
      cfg, dtype=dtype, rngs=nnx.Rngs(0), palu=palu))
  _, state = nnx.split(abstract)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  shardings = None if mesh is None else jax.tree.map(
      lambda v: variable_sharding(v, mesh), state, is_leaf=is_var)
  weights = shard_bytes(
      jax.tree.map(lambda v: v.get_value(), state, is_leaf=is_var),
      shardings)

  def cache(batch: int, rows: int) -> int:
    shapes = jax.eval_shape(lambda: abstract.init_cache(batch, rows))
    return shard_bytes(shapes, None if mesh is None
                       else cache_shardings(shapes, mesh))
  return weights, cache


def longest_context(limit: int, weights: int, cache, batch: int) -> int:
  """The longest cache that fits next to the weights at `batch` (0 when
  the weights alone do not): from two cache sizes, as a cache grows
  linearly in its rows."""
  per_row = (cache(batch, 2048) - cache(batch, 1024)) / 1024
  fixed = cache(batch, 1024) - 1024 * per_row
  room = FIT * limit - weights - fixed
  return max(0, int(room / per_row)) if per_row else 0
