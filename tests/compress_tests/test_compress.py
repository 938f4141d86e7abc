"""Compression pipeline: configs, shared latents, calibration cache, errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from palu_jax import compress as C
from palu_jax.calibrate.windows import sample_windows
from palu_jax.errors import ConfigError, PaluError
from palu_jax.model import from_params
from model_tests.test_latent_model import _base_params
from model_tests.test_model import make_model


def _fake_stats(model, seed=0):
  """Gram matrices of random correlated inputs; Fisher scores per module."""
  cfg = model.cfg
  rng = np.random.default_rng(seed)
  grams = []
  for _ in range(cfg.n_layers):
    x = rng.standard_normal((400, cfg.dim)) @ rng.standard_normal(
        (cfg.dim, cfg.dim))
    grams.append(x.T @ x)
  fisher = {f"layers.{i}.attn.{k}_proj": float(rng.uniform(0.5, 2))
            for i in range(cfg.n_layers) for k in ("k", "v")}
  return C.CalibrationStats(grams=np.stack(grams), tokens=400, fisher=fisher)


@pytest.fixture(scope="module")
def tiny():
  model, _, hf = make_model("gqa_tied")   # K=2 KV heads of 16, D=64
  return model, _base_params(model), _fake_stats(model), hf


@pytest.mark.parametrize("comp", [
    C.CompressionConfig(ratio=0.3, multiple=4),
    C.CompressionConfig(ratio=0.5, multiple=4, alloc="error"),
    C.CompressionConfig.palu(ratio=0.5, multiple=4),
    C.CompressionConfig.palu(ratio=0.7, mode="mlrd", multiple=4),
    C.CompressionConfig.palu(ratio=0.5, alloc="fisher-error", multiple=4,
                             whiten="attention", k_fraction=0.4),
    C.CompressionConfig(ratio=0.5, multiple=4, alloc="fisher-error"),
])
def test_cache_shrinks_by_the_ratio(tiny, comp):
  model, base, stats, hf = tiny
  params, palu, report = C.compress_params(model.cfg, base, stats, comp)
  assert report["kept_fraction"] == pytest.approx(1 - comp.ratio, abs=0.05)
  m = from_params(model.cfg, params, dtype=jnp.float32, palu=palu)
  cache = m.init_cache(1, 8)
  assert cache.nbytes() // 8 == report["kv_bytes_per_token"] * 2  # f32 cache
  assert palu.shared_kv == comp.shared_kv
  logits, _ = m(jnp.arange(10)[None] % hf["vocab_size"])
  assert np.all(np.isfinite(np.asarray(logits)))


def test_shared_latent_at_full_rank_reproduces_the_model(tiny):
  model, base, stats, hf = tiny
  factors = C.factorize_model(model.cfg, base, stats, 2, "attention",
                              shared_kv=True)
  full = factors["kv"][0][0].singular.shape[0]
  assert full == 64  # min(2·32, D)
  comp = C.CompressionConfig(ratio=1e-6, multiple=4)
  params, palu, _ = C.compress_params(model.cfg, base, stats, comp,
                                      factors=factors)
  assert palu.k_ranks == ((64,),) * 2
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 16)))
  np.testing.assert_allclose(
      from_params(model.cfg, params, dtype=jnp.float32, palu=palu)(tokens)[0],
      model(tokens)[0], atol=3e-4, rtol=1e-3)


def test_shared_latent_equals_explicit_reconstruction(tiny):
  """Truncated shared latent == dense model with W_k = A·B_k, W_v = A·B_v."""
  model, base, stats, hf = tiny
  comp = C.CompressionConfig(ratio=0.5, multiple=4)
  params, palu, _ = C.compress_params(model.cfg, base, stats, comp)
  explicit = dict(base)
  # B_v is folded into W_o in `params`; take it from the factorization.
  factors = C.factorize_model(model.cfg, base, stats, 2, comp.whiten,
                              comp.rope_span, shared_kv=True,
                              k_weight=comp.k_weight)
  for i in range(model.cfg.n_layers):
    lr = factors["kv"][i][0].truncate(palu.k_ranks[i][0])
    up = np.asarray(lr.up)
    explicit[f"layers.{i}.attn.k_proj.kernel"] = np.asarray(lr.down) @ up[:, :32]
    explicit[f"layers.{i}.attn.v_proj.kernel"] = np.asarray(lr.down) @ up[:, 32:]
  dense = from_params(model.cfg, explicit, dtype=jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 16)))
  got = from_params(model.cfg, params, dtype=jnp.float32, palu=palu)(tokens)[0]
  np.testing.assert_allclose(got, dense(tokens)[0], atol=3e-4, rtol=1e-3)
  assert float(jnp.max(jnp.abs(got - model(tokens)[0]))) > 1e-3


def test_incremental_decode_shared_latent(tiny):
  from model_tests.test_model import assert_incremental_matches_full
  model, base, stats, hf = tiny
  params, palu, _ = C.compress_params(
      model.cfg, base, stats, C.CompressionConfig(ratio=0.5, multiple=4))
  m = from_params(model.cfg, params, dtype=jnp.float32, palu=palu)
  assert m.init_cache(1, 4).layers[0].hv.shape == (1, 4, 0)  # stored once
  assert_incremental_matches_full(m, hf["vocab_size"])


@pytest.mark.parametrize("fields,match", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.2), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(mode="glrd", group_size=3), "group_size"),
    (dict(mode="xlrd"), "mode"), (dict(alloc="magic"), "alloc"),
    (dict(whiten="maybe"), "whiten"), (dict(k_fraction=0.4), "k_fraction"),
    (dict(multiple=5), "multiple"), (dict(k_weight=0.0), "k_weight"),
    (dict(rope_span=0), "rope_span"),
])
def test_bad_compression_config(tiny, fields, match):
  with pytest.raises(ConfigError, match=match):
    C.CompressionConfig(**fields).validate(tiny[0].cfg)


def test_nan_in_calibration_is_named(tiny):
  model, base, stats, _ = tiny
  bad = C.CalibrationStats(grams=stats.grams.copy(), tokens=stats.tokens,
                           fisher=stats.fisher)
  bad.grams[1, 3, 3] = np.inf
  with pytest.raises(PaluError, match="NaN/Inf"):
    C.compress_params(model.cfg, base, bad, C.CompressionConfig(multiple=4))


def test_fisher_allocation_needs_scores(tiny):
  model, base, stats, _ = tiny
  none = C.CalibrationStats(grams=stats.grams, tokens=stats.tokens, fisher={})
  with pytest.raises(PaluError, match="Fisher score"):
    C.compress_params(model.cfg, base, none,
                      C.CompressionConfig.palu(multiple=4))


def test_sample_windows_seeded_and_checked():
  ids = np.arange(1000)
  a = sample_windows(ids, count=5, seqlen=64, seed=3)
  assert a.shape == (5, 64) and np.all(np.diff(a, axis=1) == 1)
  np.testing.assert_array_equal(a, sample_windows(ids, count=5, seqlen=64,
                                                  seed=3))
  assert not np.array_equal(a, sample_windows(ids, count=5, seqlen=64, seed=4))
  with pytest.raises(PaluError, match="not enough"):
    sample_windows(ids[:50], count=1, seqlen=64)


@pytest.fixture(scope="module")
def stories():
  from palu_jax.checkpoint import load_source, load_tokenizer_for
  src = shared_path("models/stories260K/stories260K.bin")
  cfg, base, _ = load_source(src)
  return src, cfg, base, load_tokenizer_for(src)


def test_calibration_is_cached_on_disk(tmp_path, stories, monkeypatch):
  src, cfg, base, tok = stories
  model = from_params(cfg, base, dtype=jnp.float32)
  calib = C.CalibrationConfig(dataset="tinystories", windows=3, seqlen=32)
  first = C.calibrate(model, tok, calib, cache_dir=str(tmp_path),
                      progress=False)
  assert first.tokens == 96 and len(first.fisher) == 2 * cfg.n_layers
  assert len(os.listdir(tmp_path)) == 2          # grams + Fisher files

  import palu_jax.calibrate.activations as act
  import palu_jax.calibrate.fisher as fis
  def boom(*a, **k):
    raise AssertionError("recalibrated despite the cache")
  monkeypatch.setattr(act, "kv_input_grams", boom)
  monkeypatch.setattr(fis, "kv_fisher", boom)
  again = C.calibrate(model, tok, calib, cache_dir=str(tmp_path),
                      progress=False)
  np.testing.assert_array_equal(again.grams, first.grams)
  assert again.fisher == first.fisher
  # Other settings are another key (and would recalibrate).
  with pytest.raises(AssertionError, match="recalibrated"):
    C.calibrate(model, tok, C.CalibrationConfig(dataset="tinystories",
                                                windows=3, seqlen=32, seed=1),
                cache_dir=str(tmp_path), progress=False)


def test_compressed_checkpoint_roundtrip(tmp_path, stories):
  from palu_jax.api import load_model
  src, cfg, base, tok = stories
  comp = C.CompressionConfig(multiple=4)
  calib = C.CalibrationConfig(dataset="tinystories", windows=4, seqlen=64)
  out, report = C.compress_checkpoint(src, str(tmp_path / "c"), comp, calib,
                                      progress=False)
  with open(os.path.join(out, "palu_jax.json")) as f:
    marker = json.load(f)
  assert marker["kind"] == "palu" and marker["compression"]["ratio"] == 0.5
  assert os.path.exists(os.path.join(out, "ranks.md"))
  model, tok2 = load_model(out, dtype="float32")
  assert model.palu is not None and model.palu.shared_kv
  assert model.init_cache(1, 4).nbytes() // 4 == report["kv_bytes_per_token"] * 2
  # Same params in memory and after the orbax round trip.
  params, palu, _ = C.compress_params(cfg, base, C.calibrate(
      from_params(cfg, base, dtype=jnp.float32), tok, calib, fisher=False,
      progress=False), comp, seqlen=calib.seqlen)
  fresh = from_params(cfg, params, dtype=jnp.float32, palu=palu)
  tokens = jnp.asarray([tok.encode("Once upon a time")])
  np.testing.assert_allclose(model(tokens)[0], fresh(tokens)[0], atol=1e-5)
  with pytest.raises(ConfigError, match="already Palu-compressed"):
    C.compress_checkpoint(out, str(tmp_path / "d"), comp, calib)


def test_methods_are_peers_behind_one_interface():
  """compress_checkpoint dispatches on the config type; Palu and Eigen do
  not import each other (issue 20)."""
  import inspect

  import palu_jax.compress as palu_mod
  import palu_jax.eigen.compress as eigen_mod
  from palu_jax import pipeline
  from palu_jax.eigen.compress import EigenConfig
  assert pipeline.method_for(C.CompressionConfig()).name == "palu"
  assert pipeline.method_for(EigenConfig()).name == "eigen"
  with pytest.raises(ConfigError, match="comp: must be"):
    pipeline.method_for({"ratio": 0.5})
  assert "palu_jax.eigen" not in inspect.getsource(palu_mod)
  assert "palu_jax.compress" not in inspect.getsource(eigen_mod)
