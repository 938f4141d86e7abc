"""The dense model's decode attention: cuDNN on GPU, jnp elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.model import dense_decode
from palu_jax.model.attention import attend


def _inputs(b, s, n, kh, h, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, 1, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, h), jnp.float32).astype(dtype)
  return q, k, v


def test_pick_and_bad_name():
  q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
  want = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert dense_decode.pick(q) == want
  assert dense_decode.pick(q.astype(jnp.float32)) == "xla"
  assert dense_decode.pick(jnp.zeros((1, 1, 4, 12), jnp.bfloat16)) == "xla"
  assert dense_decode.pick(q, "xla") == "xla"
  with pytest.raises(ValueError, match="dense decode implementation"):
    dense_decode.pick(q, "flash")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("n,kh,h", [(9, 3, 64), (32, 32, 128), (32, 8, 128)])
def test_cudnn_decode_matches_jnp_attention(n, kh, h):
  """cuDNN over the token-major cache equals `attend` (the jnp causal
  attention the model uses elsewhere) at the new token's position."""
  q, k, v = _inputs(3, 512, n, kh, h, jnp.bfloat16)
  q_pos = jnp.asarray([[511], [0], [300]], jnp.int32)
  got = dense_decode.decode_attention(q, k, v, q_pos[:, 0] + 1)
  want = attend(q, k, v, q_pos)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=2e-2)
