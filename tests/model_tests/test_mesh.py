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


@pytest.mark.parametrize("bits,k_rank,v_rank,shared,quant_group,whole", [
    (16, 64, 64, False, 32, True),
    (8, 64, 64, False, 64, True),     # float8: a byte a latent
    (4, 64, 64, False, 32, True),     # two codes a byte, groups side by side
    (2, 64, 64, False, 32, True),
    (3, 64, 64, False, 32, False),    # bit planes span every group
    (4, 48, 48, False, 32, False),    # a quant group straddles two groups
    (2, 18, 18, False, 2, False),     # 18 2-bit codes: 4.5 bytes a group
    (4, 64, 0, True, 64, True),       # shared latent: keys' side only
])
def test_stored_latents_split_by_group(bits, k_rank, v_rank, shared,
                                       quant_group, whole):
  """Which caches the decode kernels may read per device over "model"
  (`_per_device`): a slice of the stored last axis must hold whole latent
  groups, which the codes' layout (`int_quant.pack`) gives for 8, 4 and
  2 bits when each group fills whole bytes and whole quant groups."""
  from palu_jax.model.latent_attention import _groups_split_whole
  from pallas_kernels.common import LatentSpec
  spec = LatentSpec(groups=4, kv_per_group=1, q_per_kv=1, head_dim=128,
                    k_rank=k_rank, v_rank=v_rank or k_rank, shared=shared,
                    bits=bits, quant_group=quant_group)
  assert _groups_split_whole(spec) is whole


@pytest.mark.parametrize("bits", [2, 4, 3])
def test_packed_codes_of_a_group_are_its_own_bytes(bits):
  """The layout `_groups_split_whole` relies on: with 2 and 4 bits, the
  bytes of group g of the packed codes are the packed codes of group g
  alone; with 3 bits (two bit planes) they are not."""
  import numpy as np
  from palu_jax.quantize.int_quant import pack
  rng = np.random.default_rng(0)
  groups, rank = 4, 32
  codes = rng.integers(0, 2 ** bits, (3, groups * rank)).astype(np.uint8)
  packed = np.asarray(pack(codes, bits))
  per = packed.shape[-1] // groups
  same = all(np.array_equal(packed[:, g * per:(g + 1) * per],
                            np.asarray(pack(codes[:, g * rank:(g + 1) * rank],
                                            bits)))
             for g in range(groups))
  assert same is (bits != 3)
