"""Device meshes from `--mesh data=D,model=M`, and the one rule table that
maps logical array axes to mesh axes.

Parameters and caches name their dimensions with logical axes ("batch",
"kv_groups", "mlp", ...); `partition_spec` turns those names into a
`PartitionSpec` for a mesh through `RULES`, so dense and compressed models
are sharded by the same table. Latent groups own their latent, B_k and
slice of W_o, so sharding "kv_groups" over "model" needs no cross-device
traffic until the output projection's partial sums.

A dimension that does not divide its mesh axis (SmolLM2's 3 KV heads over
model=2) is replicated, with one warning naming the array and the axis.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from palu_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: never sharded)
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "heads": "model",         # query heads
    "kv_heads": "model",      # KV heads of a dense cache and k/v projections
    "kv_groups": "model",     # latent groups: latents, B_k, W_o slices
    "mlp": "model",           # MLP hidden dimension
    "vocab": "model",
    "embed": None,            # model width
    "seq": None,
    "head_dim": None,
    "rank": None,             # latent rank inside a group
}


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
  """"data=2,model=4" -> {"data": 2, "model": 4}; None or "" puts every
  device on "data". Axes left out get size 1; the product must be the
  device count."""
  if not spec:
    return {"data": n_devices, "model": 1}
  sizes = {}
  for part in spec.split(","):
    name, eq, value = part.strip().partition("=")
    if name not in MESH_AXES:
      raise ConfigError("mesh", f"unknown axis {name!r} in {spec!r} (axes: "
                        f"{', '.join(MESH_AXES)})")
    if name in sizes:
      raise ConfigError("mesh", f"axis {name!r} given twice in {spec!r}")
    try:
      size = int(value) if eq else -1
    except ValueError:
      size = -1
    if size < 1:
      raise ConfigError("mesh", f"axis {name!r} needs a size >= 1, as "
                        f"{name}=N (got {part.strip()!r})")
    sizes[name] = size
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  if math.prod(sizes.values()) != n_devices:
    raise ConfigError("mesh", f"{spec!r} has {math.prod(sizes.values())} "
                      f"devices, but {n_devices} are available")
  return sizes


def spec_devices(spec: str) -> int:
  """How many devices "data=D,model=M" asks for (axes and sizes checked;
  a mesh over the first that many devices: `make_mesh(spec,
  jax.devices()[:n])`)."""
  sizes = {}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    sizes[name.strip()] = int(value) if value.strip().isdigit() else 1
  n = math.prod(sizes.values())
  parse_mesh(spec, n)
  return n


def make_mesh(spec: str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over `devices` (default: all). Its axes are
  `Auto`: XLA propagates shardings through the model's plain jnp code (an
  `Explicit` mesh, jax.make_mesh's default, would ask every ambiguous op
  such as the embedding gather for an output sharding)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh(spec, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


@functools.cache
def _warn_replicated(name: str, dim: int, size: int, axis: str,
                     axis_size: int) -> None:
  log.warning("%s: dimension %d (size %d) does not divide mesh axis %r "
              "(size %d); replicated instead", name, dim, size, axis,
              axis_size)


def partition_spec(logical: Sequence[str | None], shape: Sequence[int],
                   mesh, *, name: str = "array") -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes on `mesh` (a
  Mesh or AbstractMesh). Unknown logical names are errors; dimensions that
  do not divide their mesh axis are replicated (warned once)."""
  if len(logical) != len(shape):
    raise ConfigError(name, f"{len(logical)} logical axes for a "
                      f"{len(shape)}-d array")
  sizes = dict(mesh.shape)
  out, used = [], set()
  for dim, (axis_name, size) in enumerate(zip(logical, shape)):
    if axis_name is None:
      out.append(None)
      continue
    if axis_name not in RULES:
      raise ConfigError(name, f"unknown logical axis {axis_name!r} (known: "
                        f"{', '.join(RULES)})")
    axis = RULES[axis_name]
    if axis is None or sizes.get(axis, 1) == 1 or axis in used:
      out.append(None)
      continue
    if size % sizes[axis]:
      _warn_replicated(name, dim, size, axis, sizes[axis])
      out.append(None)
      continue
    out.append(axis)
    used.add(axis)
  return PartitionSpec(*out)


def named_sharding(logical: Sequence[str | None], shape: Sequence[int],
                   mesh: Mesh, *, name: str = "array") -> NamedSharding:
  return NamedSharding(mesh, partition_spec(logical, shape, mesh, name=name))
