"""Meshes and the logical-axis rule table (issue 19, part 1)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from palu_jax.errors import ConfigError
from palu_jax.sharding import mesh as M


def test_parse_mesh():
  assert M.parse_mesh(None, 8) == {"data": 8, "model": 1}
  assert M.parse_mesh("data=2,model=4", 8) == {"data": 2, "model": 4}
  assert M.parse_mesh("model=8", 8) == {"data": 1, "model": 8}


@pytest.mark.parametrize("spec,needle", [
    ("tensor=8", "unknown axis 'tensor'"),
    ("data=2,data=4", "given twice"),
    ("data=two", "needs a size >= 1"),
    ("data=0,model=8", "needs a size >= 1"),
    ("model", "needs a size >= 1"),
    ("data=2,model=2", "has 4 devices, but 8 are available"),
])
def test_bad_meshes_name_the_axis(spec, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    M.parse_mesh(spec, 8)
  assert str(e.value).startswith("mesh: ")


def test_rules_shard_groups_and_replicate_what_does_not_divide(caplog):
  mesh = AbstractMesh((2, 4), ("data", "model"))
  assert M.partition_spec(("batch", "seq", "kv_groups", "rank"),
                          (8, 128, 8, 64), mesh) == P("data", None, "model",
                                                      None)
  assert M.partition_spec(("embed", "mlp"), (576, 1536), mesh) == P(
      None, "model")
  # SmolLM2: 3 KV heads over model=4 -> replicated, with a warning
  with caplog.at_level(logging.WARNING):
    spec = M.partition_spec(("batch", "seq", "kv_heads", "head_dim"),
                            (8, 64, 3, 64), mesh, name="layers.0.cache.k")
  assert spec == P("data", None, None, None)
  assert "layers.0.cache.k" in caplog.text and "'model'" in caplog.text
  with pytest.raises(ConfigError, match="unknown logical axis 'heads2'"):
    M.partition_spec(("heads2",), (4,), mesh)
  with pytest.raises(ConfigError, match="2 logical axes for a 1-d"):
    M.partition_spec(("batch", "seq"), (4,), mesh)


def test_real_mesh_on_8_host_devices():
  """In a fresh process with 8 CPU devices: a 2x4 mesh places a latent
  cache [B, S, G, R] with batch over data and groups over model."""
  code = textwrap.dedent("""
      import json, jax, jax.numpy as jnp
      from palu_jax.sharding.mesh import make_mesh, named_sharding
      mesh = make_mesh("data=2,model=4")
      x = jax.device_put(jnp.zeros((4, 16, 8, 32)), named_sharding(
          ("batch", "seq", "kv_groups", "rank"), (4, 16, 8, 32), mesh))
      shapes = sorted({s.data.shape for s in x.addressable_shards})
      print(json.dumps({"devices": len(jax.devices()),
                        "shards": len(x.addressable_shards),
                        "shapes": shapes}))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__)))))
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"devices": 8, "shards": 8, "shapes": [[2, 16, 2, 32]]}
