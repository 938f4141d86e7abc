"""The compressed model's decode step through the kernels vs the jnp path.

On the CPU the kernels run in interpret mode; with JAX_PLATFORMS=cuda the
same test compiles them (see also eval/check_decode.py for SmolLM2-135M).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.model.transformer import random_model

CFG = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, hidden_dim=128, max_seq_len=256)


@pytest.mark.parametrize("group_size,rank,shared,bits", [
    (1, 16, False, 16),     # M-LRD
    (2, 32, True, 16),      # J-LRD, one shared latent
    (2, 32, False, 4),
    (2, 64, True, 3),       # rank = the full width of k and v
])
def test_kernel_decode_equals_reference_decode(group_size, rank, shared, bits):
  # With packed latents, one layer: a later layer re-quantizes latents of
  # inputs that differ by rounding, and a flipped code moves its logits by
  # far more than the kernel's own error (measured: 0.016 vs 0.002 at 2
  # layers); the per-layer outputs agree to 1e-3 either way.
  cfg = CFG if bits == 16 else dataclasses.replace(CFG, n_layers=1)
  groups = cfg.n_kv_heads // group_size
  ranks = ((rank,) * groups,) * cfg.n_layers
  palu = PaluConfig(group_size=group_size, k_ranks=ranks, v_ranks=ranks,
                    shared_kv=shared, kv_bits=bits, quant_group=32,
                    scale_dtype="float16")
  model = random_model(cfg, dtype=jnp.float16, seed=1, palu=palu)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
  logits = {}
  for impl in ("xla", "pallas"):
    model.set_attention_implementation(impl)
    cache = model.init_cache(2, 40)
    # ragged prompts: 6 and 4 real tokens
    _, cache = model(tokens[:, :6], cache,
                     num_valid=jnp.asarray([6, 4], jnp.int32))
    steps = []
    for t in range(6, 9):
      out, cache = model(tokens[:, t:t + 1], cache)
      steps.append(np.asarray(out[:, 0], np.float32))
    logits[impl] = np.stack(steps)
  assert model.layers[0].attn.uses_kernel()
  scale = np.max(np.abs(logits["xla"]))
  np.testing.assert_allclose(logits["pallas"], logits["xla"],
                             atol=5e-3 * scale)
  assert np.array_equal(logits["pallas"].argmax(-1), logits["xla"].argmax(-1))


def test_unequal_group_ranks_use_the_jnp_path():
  palu = PaluConfig(group_size=1, k_ranks=((16, 8),) * 2,
                    v_ranks=((16, 16),) * 2)
  model = random_model(CFG, dtype=jnp.float16, palu=palu)
  model.set_attention_implementation("pallas")
  assert not model.layers[0].attn.uses_kernel()
  assert model.init_cache(1, 40).max_len == 40   # no rounding for kernels


@pytest.mark.parametrize("bits", [16, 4])
def test_float32_greedy_decode_is_the_same_with_kernels(bits):
  """In float32 the kernel's dots are exact (IEEE, not TF32), so a greedy
  loop through the kernels follows the jnp path token for token, and its
  logits agree to f32 rounding (with 16-bit inputs the two round at
  different points; see eval/check_decode.py)."""
  cfg = dataclasses.replace(CFG, n_layers=2 if bits == 16 else 1)
  ranks = ((32,),) * cfg.n_layers
  palu = PaluConfig(group_size=2, k_ranks=ranks, v_ranks=ranks, kv_bits=bits,
                    quant_group=32, scale_dtype="float16")
  model = random_model(cfg, dtype=jnp.float32, seed=2, palu=palu)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 5)))
  runs = {}
  for impl in ("xla", "pallas"):
    model.set_attention_implementation(impl)
    with jax.default_matmul_precision("highest"):  # no TF32 on a GPU
      runs[impl] = _greedy_logits(model, prompt)
  assert model.layers[0].attn.uses_kernel()
  np.testing.assert_array_equal(runs["pallas"].argmax(-1),
                                runs["xla"].argmax(-1))
  np.testing.assert_allclose(runs["pallas"], runs["xla"],
                             atol=1e-5 * np.max(np.abs(runs["xla"])))


def _greedy_logits(model, prompt, steps: int = 10):
  """Logits [steps, B, V] of a greedy loop after prefilling `prompt`."""
  cache = model.init_cache(prompt.shape[0], 32)
  logits, cache = model(prompt, cache, fresh_cache=True)
  token, out = jnp.argmax(logits[:, -1:], -1), []
  for _ in range(steps):
    logits, cache = model(token, cache)
    out.append(np.asarray(logits[:, 0]))
    token = jnp.argmax(logits, -1)
  return np.stack(out)
