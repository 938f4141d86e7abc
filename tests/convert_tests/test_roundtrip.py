"""Each converter round-trips: write a tiny random checkpoint in its format,
convert it, and compare palu_jax logits with the independent NumPy forward."""

import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref
import writers
from convert import load_checkpoint
from palu_jax.config import ModelConfig
from palu_jax.model import from_params
from variants import VARIANTS

TOKENS = np.array([5, 17, 3, 96, 40, 40, 1, 0, 77, 12, 64, 33])


def _palu_logits(src):
  cfg, params = load_checkpoint(str(src))
  model = from_params(ModelConfig.from_dict(cfg), params, dtype=jnp.float32)
  logits, _ = model(jnp.asarray(TOKENS)[None])
  return np.asarray(logits[0]), cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype,shards", [("float32", 1), ("bfloat16", 2),
                                          ("float16", 3)])
def test_hf_safetensors(tmp_path, variant, dtype, shards):
  hf = VARIANTS[variant]
  stored = writers.write_hf_dir(str(tmp_path), hf, numpy_ref.random_hf_weights(hf),
                                dtype=dtype, shards=shards)
  got, cfg = _palu_logits(tmp_path)
  want = numpy_ref.forward(stored, hf, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert cfg["tie_embeddings"] == hf["tie_word_embeddings"]
  assert cfg["qkv_bias"] == (hf["model_type"] == "qwen2")


@pytest.mark.parametrize("variant", ["mha", "gqa_tied", "qwen2_bias",
                                     "mistral_headdim"])
@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_1"])
def test_gguf(tmp_path, variant, quant):
  hf = VARIANTS[variant]
  path = tmp_path / "model.gguf"
  stored = writers.write_gguf(str(path), hf, numpy_ref.random_hf_weights(hf),
                              quant=quant)
  got, _ = _palu_logits(path)
  # The reference runs the raw (Meta-order) GGUF weights with interleaved
  # RoPE, so it checks that the converter undid the permutation.
  want = numpy_ref.forward(stored, hf, TOKENS, interleaved_rope=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["mha", "gqa_tied"])
def test_llama2c(tmp_path, variant):
  hf = VARIANTS[variant]
  weights = numpy_ref.random_hf_weights(hf)
  path = tmp_path / "model.bin"
  writers.write_llama2c(str(path), hf, weights)
  got, cfg = _palu_logits(path)
  want = numpy_ref.forward(writers.meta_weights(weights, hf), hf, TOKENS,
                           interleaved_rope=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert cfg["tie_embeddings"] == hf["tie_word_embeddings"]


def test_meta_and_hf_layouts_agree():
  """Sanity of the reference itself: both RoPE layouts give one model."""
  hf = VARIANTS["gqa_tied"]
  w = numpy_ref.random_hf_weights(hf)
  np.testing.assert_allclose(
      numpy_ref.forward(w, hf, TOKENS),
      numpy_ref.forward(writers.meta_weights(w, hf), hf, TOKENS,
                        interleaved_rope=True), atol=1e-9)
