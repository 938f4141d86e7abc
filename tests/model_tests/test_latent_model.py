"""Palu latent-cache model against the dense model it was folded from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.config import PaluConfig
from palu_jax.decompose import lrd
from palu_jax.decompose.fold import palu_params
from palu_jax.errors import CheckpointError, ConfigError
from palu_jax.model import from_params
from model_tests.test_model import assert_incremental_matches_full, make_model


def _base_params(model):
  from flax import nnx
  return {".".join(map(str, p)): np.asarray(v[...], np.float32)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _decompose(params, cfg, group_size, keep):
  """Plain SVD of every layer's k/v projection, `keep` of each group's dims."""
  groups = cfg.n_kv_heads // group_size
  rank = max(1, int(round(keep * group_size * cfg.head_dim)))
  parts = {}
  for kind in ("k", "v"):
    parts[kind] = [lrd.decompose_projection(
        params[f"layers.{i}.attn.{kind}_proj.kernel"], [rank] * groups,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        group_size=group_size) for i in range(cfg.n_layers)]
  return parts


def _compressed(variant, group_size, keep):
  model, _, hf = make_model(variant)
  base = _base_params(model)
  parts = _decompose(base, model.cfg, group_size, keep)
  params, palu = palu_params(base, model.cfg, group_size, parts["k"], parts["v"])
  return model, base, parts, from_params(model.cfg, params, dtype=jnp.float32,
                                         palu=palu), hf


def _tokens(hf, n=2, t=20, seed=3):
  return jnp.asarray(np.random.default_rng(seed).integers(
      0, hf["vocab_size"], (n, t)))


@pytest.mark.parametrize("variant", ["mha", "gqa_tied", "qwen2_bias",
                                     "mistral_headdim"])
@pytest.mark.parametrize("group", [1, 2])
def test_full_rank_reproduces_the_dense_model(variant, group):
  model, _, _, palu_model, hf = _compressed(variant, group, 1.0)
  tokens = _tokens(hf)
  want, _ = model(tokens)
  got, _ = palu_model(tokens)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gqa_tied", "qwen2_bias", "llama3_scaling"])
@pytest.mark.parametrize("group", [1, "all"])
def test_folded_latent_path_equals_explicit_reconstruction(variant, group):
  """Truncated factors: the latent model (B_v folded into W_o, keys rebuilt
  from latents) equals the dense model whose W_k, W_v are replaced by
  down·up and whose W_o is the original."""
  model0, _, _ = make_model(variant)
  group = model0.cfg.n_kv_heads if group == "all" else group
  model, base, parts, palu_model, hf = _compressed(variant, group, 0.5)
  explicit = dict(base)
  for i in range(model.cfg.n_layers):
    for kind in ("k", "v"):
      explicit[f"layers.{i}.attn.{kind}_proj.kernel"] = lrd.reconstruct(
          parts[kind][i])
  dense = from_params(model.cfg, explicit, dtype=jnp.float32)
  tokens = _tokens(hf)
  want, _ = dense(tokens)
  got, _ = palu_model(tokens)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  # ... and the truncation really changed the model.
  orig, _ = model(tokens)
  assert float(jnp.max(jnp.abs(orig - want))) > 1e-3


@pytest.mark.parametrize("variant", ["gqa_tied", "qwen2_bias"])
def test_incremental_decode_equals_full_forward_ragged(variant):
  _, _, _, palu_model, hf = _compressed(variant, 1, 0.5)
  # the compressed gqa_tied model's logits reach ~51, where 2e-5 is three
  # f32 ulps: the cache path and the full forward sum in other orders and
  # differed by six ulps (2.3e-5) on the XLA CPU build of 2026-12-03; a
  # wrong cache row or position moves logits by orders of magnitude more.
  # rtol as for the quantized models (test_quant_model)
  assert_incremental_matches_full(palu_model, hf["vocab_size"], rtol=1e-6)


def test_latent_cache_shapes_and_bytes():
  _, _, _, palu_model, _ = _compressed("gqa_tied", 1, 0.5)
  cache = palu_model.init_cache(3, 10)
  p = palu_model.palu
  assert cache.layers[0].hk.shape == (3, 10, sum(p.k_ranks[0]))
  assert cache.layers[0].hv.shape == (3, 10, sum(p.v_ranks[0]))
  # Half the dims kept -> half the dense cache's bytes.
  dense = make_model("gqa_tied")[0].init_cache(3, 10)
  assert cache.nbytes() * 2 == dense.nbytes()


def test_palu_config_rejects_impossible_ranks():
  model, _, _ = make_model("gqa_tied")     # K=2, H=16
  cfg = model.cfg
  ok = dict(group_size=1, k_ranks=((8, 8),) * 2, v_ranks=((8, 8),) * 2)
  PaluConfig(**ok).validate(cfg)
  with pytest.raises(ConfigError, match="group_size"):
    PaluConfig(**dict(ok, group_size=3)).validate(cfg)
  with pytest.raises(ConfigError, match=r"k_ranks\[1\].*rank 17"):
    PaluConfig(**dict(ok, k_ranks=((8, 8), (8, 17)))).validate(cfg)
  with pytest.raises(ConfigError, match="v_ranks.*1 layers"):
    PaluConfig(**dict(ok, v_ranks=((8, 8),))).validate(cfg)
  assert PaluConfig.from_dict(PaluConfig(**ok).to_dict()) == PaluConfig(**ok)


def test_params_that_do_not_fit_are_named():
  model, base, parts, palu_model, _ = _compressed("gqa_tied", 1, 0.5)
  params, palu = palu_params(base, model.cfg, 1, parts["k"], parts["v"])
  params["layers.1.attn.k_up"] = params["layers.1.attn.k_up"][:-1]
  with pytest.raises(CheckpointError, match="layers.1.attn.k_up"):
    from_params(model.cfg, params, palu=palu)


@pytest.mark.parametrize("variant", ["mha", "gqa_tied", "qwen2_bias"])
@pytest.mark.parametrize("group,keep", [(1, 0.5), ("all", 0.75)])
def test_dense_prefill_equals_the_jnp_path(variant, group, keep):
  """Prefill through jax.nn.dot_product_attention (its XLA path on the CPU;
  value latents wider than a head at keep 0.75 with all heads in one group,
  cut into padded chunks) equals the jnp attention, without a cache and
  with a fresh one, and the decode step after it sees the same cache."""
  model0, _, _ = make_model(variant)
  group = model0.cfg.n_kv_heads if group == "all" else group
  *_, palu_model, hf = _compressed(variant, group, keep)
  tokens = _tokens(hf, t=12)
  logits = {}
  for impl in ("jnp", "xla"):
    palu_model.set_attention_implementation("xla", prefill=impl)
    full, _ = palu_model(tokens)
    cache = palu_model.init_cache(2, 16)
    pre, cache = palu_model(tokens[:, :11], cache, fresh_cache=True)
    step, _ = palu_model(tokens[:, 11:], cache)
    logits[impl] = (full, pre, step)
  for want, got in zip(logits["jnp"], logits["xla"]):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(logits["xla"][1], logits["xla"][0][:, :11],
                             atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(logits["xla"][2], logits["xla"][0][:, 11:],
                             atol=2e-4, rtol=1e-4)


def test_unsupported_prefill_implementation_falls_back(caplog):
  """cuDNN is not there on the CPU: the jnp path runs, and says why."""
  *_, palu_model, hf = _compressed("gqa_tied", 1, 0.5)
  tokens = _tokens(hf, t=8)
  palu_model.set_attention_implementation("xla", prefill="jnp")
  want, _ = palu_model(tokens)
  palu_model.set_attention_implementation("xla", prefill="cudnn")
  with caplog.at_level("WARNING"):
    got, _ = palu_model(tokens)
  np.testing.assert_array_equal(got, want)
  assert "using the jnp path" in caplog.text
  palu_model.set_attention_implementation("xla", prefill="flash")
  with pytest.raises(ValueError, match="prefill_implementation"):
    palu_model(tokens)


@pytest.mark.parametrize("bits", [16, 4])
def test_bfloat16_palu_model_generates_on_cpu(bits):
  """A bf16 compressed model decodes on the CPU (XLA:CPU has no batched
  bf16 x bf16 -> f32 dot outside a fusion; the jnp mix runs in f32 there),
  and its logits follow the float32 model's to bf16 precision."""
  from flax import nnx
  from palu_jax.config import ModelConfig, PaluConfig
  from palu_jax.generate import Generator
  from palu_jax.model import Transformer
  cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, hidden_dim=64, max_seq_len=64)
  ranks = ((8,),) * 2
  palu = PaluConfig(group_size=2, k_ranks=ranks, v_ranks=ranks, kv_bits=bits,
                    quant_group=8)
  f32 = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), palu=palu)
  _, state = nnx.split(f32)
  bf16 = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), palu=palu)
  nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  ids = Generator(bf16).generate_ids([[1, 2, 3], [4, 5]], max_new_tokens=5)
  assert [len(x) for x in ids] == [5, 5]
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
  want = np.asarray(f32(tokens)[0])
  got = np.asarray(bf16(tokens)[0])
  assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))
