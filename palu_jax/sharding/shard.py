"""Placing a model's parameters and its decode cache on a mesh.

Parameters carry their logical axes as `logical_axes` metadata, set where
the model creates them (`layers.linear(axes=...)`, `nnx.Param(...,
logical_axes=...)`); `shard_state` puts each on the mesh by the one rule
table (`mesh.RULES`). An array without the metadata (LoRA factors, say) is
replicated. Caches are sharded by structure: batch over "data", a dense
cache's KV heads and a latent cache's latent width ("kv_groups") over
"model", float8 and packed 4-/2-bit codes with their scales too (a group's
codes are whole bytes, side by side in group order); 3-bit codes only over
"data" (two bit planes, each spanning every group).

Sharding decides where arrays live; XLA's SPMD partitioner then runs the
same jitted programs on every device, so a sharded model computes what
the single-device one does (tests/model_tests/test_sharded_model.py).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from palu_jax.model.cache import Cache, LayerKV, LayerLatent, LayerQuantLatent
from palu_jax.sharding.mesh import named_sharding


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh, *, name: str = "param"
                      ) -> NamedSharding:
  """The NamedSharding of one parameter from its `logical_axes` metadata
  (replicated without it)."""
  shape = var.get_value().shape
  axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
  return named_sharding(axes, shape, mesh, name=name)


def flat_shardings(state, mesh: Mesh) -> dict[str, NamedSharding]:
  """{flat parameter name ('layers.0.attn.k_down', the checkpoint keys):
  its NamedSharding} for every Variable of `state` (abstract or not)."""
  out = {}
  for keys, var in nnx.to_flat_state(state):
    name = ".".join(map(str, keys))
    out[name] = variable_sharding(var, mesh, name=name)
  return out


def put(x, sharding: NamedSharding):
  """A host or local array as a global array with `sharding`: each process
  moves only the slices its own devices hold (every process passes the
  same x)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-process) array as numpy on this
  process: every process gets the whole array."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_state(state, mesh: Mesh):
  """The state with every parameter placed on `mesh` by its logical axes
  (metadata kept)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(put(v.get_value(), variable_sharding(
          v, mesh, name=jax.tree_util.keystr(path)))),
      state, is_leaf=_is_variable)


def _latent(x, mesh, name) -> NamedSharding:
  # [B, S, R]: R (the groups side by side) over "model"; an empty side
  # (shared latent) only over "data"
  axes = ("batch", "seq", "kv_groups" if x.shape[-1] else None)
  return named_sharding(axes, x.shape, mesh, name=name)


def cache_shardings(cache: Cache, mesh: Mesh) -> Cache:
  """A Cache-shaped pytree of NamedShardings (for
  `jax.lax.with_sharding_constraint` or `jax.device_put`)."""
  layers = []
  for i, layer in enumerate(cache.layers):
    name = f"cache.layers[{i}]"
    if isinstance(layer, LayerKV):
      axes = ("batch", "seq", "kv_heads", "head_dim")
      layers.append(LayerKV(
          k=named_sharding(axes, layer.k.shape, mesh, name=name + ".k"),
          v=named_sharding(axes, layer.v.shape, mesh, name=name + ".v")))
    elif isinstance(layer, LayerLatent):
      layers.append(LayerLatent(hk=_latent(layer.hk, mesh, name + ".hk"),
                                hv=_latent(layer.hv, mesh, name + ".hv")))
    elif isinstance(layer, LayerQuantLatent):
      arrays = {f.name: getattr(layer, f.name)
                for f in dataclasses.fields(layer)
                if f.metadata.get("pytree_node", True)}
      # codes, scales, offsets [B, S, *] over "model" like 16-bit latents:
      # where the groups divide it a device's slice is whole groups, which
      # the decode kernels read in place (`latent_attention._per_device`);
      # 3-bit codes are two bit planes, each spanning every group
      width = None if layer.bits == 3 else "kv_groups"
      layers.append(layer.replace(**{
          k: named_sharding(("batch", "seq", width if v.shape[-1] else None),
                            v.shape, mesh, name=f"{name}.{k}")
          for k, v in arrays.items()}))
    else:
      raise TypeError(f"{name}: no sharding rule for {type(layer).__name__}")
  return Cache(layers=tuple(layers), lengths=named_sharding(
      ("batch",), cache.lengths.shape, mesh, name="cache.lengths"))


def batch_sharding(shape, mesh: Mesh, *, name: str) -> NamedSharding:
  """Inputs [B, ...] (prompts, lengths): batch over "data"."""
  return named_sharding(("batch",) + (None,) * (len(shape) - 1), shape,
                        mesh, name=name)


def batch_placer(mesh: Mesh | None, *, name: str):
  """A function putting [B, ...] host arrays on the device(s): batch over
  "data" with a mesh, the default device without."""
  import jax.numpy as jnp
  if mesh is None:
    return jnp.asarray
  return lambda x: put(x, batch_sharding(np.shape(x), mesh, name=name))


def split_for(model, mesh: Mesh | None, *filters):
  """nnx.split(model, *filters) with every state placed on `mesh`."""
  parts = nnx.split(model, *filters)
  if mesh is None:
    return parts
  return (parts[0],) + tuple(shard_state(s, mesh) for s in parts[1:])
