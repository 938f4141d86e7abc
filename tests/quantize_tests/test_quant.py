"""Hadamard rotation and packed integer quantization."""

import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.errors import ConfigError
from palu_jax.quantize import hadamard, int_quant


@pytest.mark.parametrize("n", [1, 2, 8, 64, 96, 48, 200])
def test_rotation_is_orthonormal_and_fwht_matches(n):
  h = hadamard.rotation(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
  assert hadamard.block_size(n) == {96: 32, 48: 16, 200: 8}.get(n, n)
  x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(hadamard.fwht(jnp.asarray(x))),
                             x @ h, atol=1e-5)


def test_fold_keeps_the_product_and_spreads_outliers():
  rng = np.random.default_rng(0)
  down, up = rng.standard_normal((32, 64)), rng.standard_normal((64, 48))
  d2, u2 = hadamard.fold_rotation(down, up)
  np.testing.assert_allclose(d2 @ u2, down @ up, atol=1e-10)
  x = rng.standard_normal((500, 32))
  h = x @ down
  h[:, 5] *= 50.0                              # one outlier channel
  rotated = h @ hadamard.rotation(64)
  err = {}
  for name, lat in (("plain", h), ("rotated", rotated)):
    codes, s, z = int_quant.quantize(jnp.asarray(lat), bits=3, group=64)
    back = np.asarray(int_quant.dequantize(codes, s, z, group=64))
    err[name] = np.mean((back - lat) ** 2)
  assert err["rotated"] < 0.5 * err["plain"]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 10, 11, 32, 33, 96, 100])
def test_pack_unpack_round_trip(bits, n):
  rng = np.random.default_rng(bits * 1000 + n)
  codes = rng.integers(0, 2 ** bits, (2, 5, n)).astype(np.uint8)
  packed = int_quant.pack(jnp.asarray(codes), bits)
  assert packed.shape[-1] == int_quant.packed_width(n, bits)
  assert packed.dtype == jnp.uint8
  # bits/8 bytes per code, rows padded to 8 codes
  assert packed.nbytes == 10 * bits * -(-n // 8)
  np.testing.assert_array_equal(np.asarray(int_quant.unpack(packed, bits, n)),
                                codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_layout_bit_by_bit(bits):
  """The documented byte layout, checked against a loop over single codes."""
  n = 24
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, n).astype(np.uint8)
  packed = np.asarray(int_quant.pack(jnp.asarray(codes), bits))
  expect = np.zeros(int_quant.packed_width(n, bits), np.uint8)
  for i, c in enumerate(codes.tolist()):
    if bits == 4:
      expect[i // 2] |= c << (4 * (i % 2))
    else:
      expect[i // 4] |= (c & 3) << (2 * (i % 4))
      if bits == 3:
        expect[2 * n // 8 + i // 8] |= (c >> 2) << (i % 8)
  np.testing.assert_array_equal(packed, expect)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [8, 32, 96])
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16])
def test_quantization_error_at_most_half_a_step(bits, group, scale_dtype):
  rng = np.random.default_rng(group + bits)
  x = rng.standard_normal((4, 9, 96)).astype(np.float32) * rng.uniform(
      0.1, 10, (4, 9, 1)).astype(np.float32)
  codes, scale, zero = int_quant.quantize(jnp.asarray(x), bits=bits,
                                          group=group, scale_dtype=scale_dtype)
  assert int(codes.max()) < 2 ** bits and scale.dtype == scale_dtype
  back = np.asarray(int_quant.dequantize(codes, scale, zero, group=group))
  step = np.repeat(np.asarray(scale, np.float32), group, axis=-1)
  # Half a step of the stored scale (plus float32 arithmetic).
  assert np.all(np.abs(back - x) <= 0.5 * step + 1e-5 * np.abs(x) + 1e-6)
  # ... and the grid is used: the error is not trivially small.
  assert np.max(np.abs(back - x) / step) > 0.3


def test_bad_quant_arguments():
  x = jnp.zeros((2, 96))
  with pytest.raises(ConfigError, match="kv_bits"):
    int_quant.quantize(x, bits=5, group=32)
  with pytest.raises(ConfigError, match="quant_group"):
    int_quant.quantize(x, bits=4, group=40)
  with pytest.raises(ConfigError, match="power of two"):
    hadamard.hadamard_matrix(12)
