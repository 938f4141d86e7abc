"""Eigen Attention: bases, threshold search, budget mode, folded models."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from palu_jax.calibrate.activations import kv_input_grams
from palu_jax.calibrate.statistics import CalibrationStats
from palu_jax.kv_report import kv_bytes_per_token
from palu_jax.decompose.fold import palu_params
from palu_jax.eigen import threshold as T
from palu_jax.eigen.basis import activation_basis, projection_basis
from palu_jax.eigen.compress import (EigenConfig, eigen_params, eigen_parts,
                                     layer_bases)
from palu_jax.eigen.layer_error import LayerError, attention_inputs
from palu_jax.errors import ConfigError, PaluError
from palu_jax.model import from_params
from model_tests.test_latent_model import _base_params
from model_tests.test_model import make_model


def _windows(vocab, n=4, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n, t))


@pytest.fixture(scope="module", params=["gqa_tied", "qwen2_bias"])
def calibrated(request):
  """A tiny model (K=2 KV heads of 16), its Grams and error inputs."""
  model, _, hf = make_model(request.param)
  windows = _windows(hf["vocab_size"])
  grams, tokens = kv_input_grams(model, windows, progress=False)
  stats = CalibrationStats(grams=grams, tokens=tokens, fisher={})
  inputs = attention_inputs(model, windows, progress=False)
  return model, _base_params(model), stats, inputs, hf


def _stacked_activations(model, base, windows, kind):
  """[tokens·K, H] pre-RoPE key (value) rows of every head, layer by layer,
  from the layer inputs and the dense kernel (numpy, float64)."""
  cfg = model.cfg
  xs = np.asarray(attention_inputs(model, windows, progress=False),
                  np.float64)
  out = []
  for i in range(cfg.n_layers):
    w = np.asarray(base[f"layers.{i}.attn.{kind}_proj.kernel"], np.float64)
    acts = xs[i].reshape(-1, cfg.dim) @ w           # [tokens, K·H]
    out.append(acts.reshape(-1, cfg.head_dim))      # heads stacked as rows
  return out


def test_basis_is_the_svd_of_stacked_activations(calibrated):
  """The Gram route equals numpy's SVD of the real stacked activations."""
  model, base, stats, _, hf = calibrated
  windows = _windows(hf["vocab_size"])
  rows = {kind: _stacked_activations(model, base, windows, kind)
          for kind in ("k", "v")}
  for i, bases in enumerate(layer_bases(model.cfg, base, stats)):
    for kind, basis in zip(("k", "v"), bases):
      _, s, vt = np.linalg.svd(rows[kind][i], full_matrices=False)
      want = np.square(s) / stats.tokens       # layer_bases uses XᵀX / tokens
      np.testing.assert_allclose(basis.energy, want, rtol=2e-3,
                                 atol=1e-6 * want[0])
      # Same leading subspaces (the spectra have gaps there).
      for k in (2, 8):
        np.testing.assert_allclose(basis.projector(k), vt[:k].T @ vt[:k],
                                   atol=2e-3)


@pytest.mark.parametrize("rows,h", [(200, 16), (5, 16)])
def test_basis_is_orthonormal(rows, h):
  acts = np.random.default_rng(0).standard_normal((rows, h)) * np.linspace(
      3, 0.1, h)
  b = activation_basis(acts)
  np.testing.assert_allclose(b.vectors.T @ b.vectors, np.eye(h), atol=1e-5)
  assert np.all(np.diff(b.energy) <= 1e-6 * b.energy[0])
  p = b.projector(4)
  np.testing.assert_allclose(p @ p, p, atol=1e-5)


def test_basis_rejects_bad_input():
  with pytest.raises(PaluError, match="finite"):
    activation_basis(np.full((4, 3), np.nan))
  with pytest.raises(PaluError, match="Gram"):
    projection_basis(np.ones((8, 16)), np.eye(4), 8)


def test_energy_rank_is_monotone_and_respects_the_floor():
  rng = np.random.default_rng(1)
  energy = np.sort(rng.exponential(size=64))[::-1]
  floor = T.floor_rank(64, 0.45, 1)
  assert floor == 29                                   # ⌈0.45·64⌉
  assert T.floor_rank(64, 0.45, 16) == 32
  ranks = [T.energy_rank(energy, tau, floor=floor) for tau in T.thresholds(0.02)]
  assert ranks[0] == 64 and all(a >= b for a, b in zip(ranks, ranks[1:]))
  assert min(ranks) == floor
  cum = np.cumsum(energy) / energy.sum()
  for tau in (0.99, 0.9, 0.95):
    r = T.energy_rank(energy, tau)
    assert cum[r - 1] >= tau - 1e-12 and (r == 1 or cum[r - 2] < tau)
  assert T.energy_rank(energy, 0.5, multiple=16) % 16 == 0
  assert T.thresholds(0.25) == [1.0, 0.75, 0.5, 0.25]


def test_search_stops_at_the_first_violation():
  """τ lowers while the error stays below ε; a later dip does not resume."""
  energy = np.linspace(2.0, 0.1, 16) ** 2
  table = {}
  def error(rk, rv):
    e = 0.01 * (32 - rk - rv)
    e = 0.0 if rk + rv == 32 else e
    if rk + rv == 20:             # a dip below ε after a violation
      e = 0.0
    table[(rk, rv)] = e
    return e
  s = T.sweep_layer(energy, energy, error, step=0.02, floor=0.45)
  assert s.complete and s.ranks[-1] == (8, 8)
  assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(s.ranks, s.ranks[1:]))
  i = s.choose(0.05)
  assert all(e < 0.05 for e in s.errors[1:i + 1])
  assert s.errors[i + 1] >= 0.05
  # Larger ε never keeps more.
  picks = [sum(s.ranks[s.choose(eps)]) for eps in (0.01, 0.05, 0.1, 0.2, 1.0)]
  assert all(a >= b for a, b in zip(picks, picks[1:]))
  assert s.ranks[s.choose(1.0)] == (8, 8)              # down to the floor
  # With eps the sweep stops at the violation, measuring nothing further.
  early = T.sweep_layer(energy, energy, error, floor=0.45, eps=0.05)
  assert not early.complete and early.errors[-1] >= 0.05
  assert early.choose(0.05) == i


def test_error_mode_choice_is_what_the_search_promises(calibrated):
  model, base, stats, inputs, _ = calibrated
  # Random weights have flat spectra: one direction less already costs ~0.1.
  econf = EigenConfig(eps=0.3, multiple=1, floor=0.3)
  params, palu, report = eigen_params(model.cfg, base, stats, model, inputs,
                                      econf)
  bases = layer_bases(model.cfg, base, stats)
  h = model.cfg.head_dim
  for i, row in enumerate(report["eigen"]["layers"]):
    rk, rv = palu.k_ranks[i][0], palu.v_ranks[i][0]
    assert set(palu.k_ranks[i]) == {rk} and set(palu.v_ranks[i]) == {rv}
    assert (row["k_rank"], row["v_rank"]) == (rk, rv)
    assert rk >= math.ceil(0.3 * h) and rv >= math.ceil(0.3 * h)
    assert row["error"] < 0.3 or row["tau"] == 1.0
    # One step further would break the budget (unless at the floor).
    err = LayerError(model.layers[i].attn, inputs[i])
    nxt = round(row["tau"] - 0.02, 10)
    pair = (T.energy_rank(bases[i][0].energy, nxt, floor=math.ceil(0.3 * h)),
            T.energy_rank(bases[i][1].energy, nxt, floor=math.ceil(0.3 * h)))
    if pair != (rk, rv) and nxt > 0:
      assert err(bases[i][0].projector(pair[0]),
                 bases[i][1].projector(pair[1])) >= 0.3
  assert report["kept_fraction"] < 1.0


def test_layer_error_matches_the_compressed_attention(calibrated):
  """LayerError (dense attention with projected kernels) == the error of the
  folded latent attention the compressed model really runs."""
  model, base, stats, inputs, _ = calibrated
  cfg = model.cfg
  bases = layer_bases(cfg, base, stats)
  chosen = [(6, 9)] * cfg.n_layers
  parts = eigen_parts(cfg, base, bases, chosen)
  params, palu = palu_params(base, cfg, 1, parts["k"], parts["v"])
  small = from_params(cfg, params, dtype=jnp.float32, palu=palu)
  x = jnp.asarray(inputs[0])
  b, t, _ = x.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  from palu_jax.model.layers import rope_cos_sin, rope_inv_freq
  cos, sin = rope_cos_sin(pos, rope_inv_freq(cfg))
  zero = jnp.zeros((b,), jnp.int32)
  ref, _ = model.layers[0].attn(x, cos, sin, pos, None, zero)
  got, _ = small.layers[0].attn(x, cos, sin, pos, None, zero)
  want = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  err = LayerError(model.layers[0].attn, inputs[0], batch_size=3)
  assert err(bases[0][0].projector(6), bases[0][1].projector(9)) == \
      pytest.approx(want, rel=1e-4)
  eye = np.eye(cfg.head_dim)
  assert err(eye, eye) == 0.0


def test_full_rank_bases_reproduce_the_model(calibrated):
  model, base, stats, inputs, hf = calibrated
  cfg = model.cfg
  # ε below any float error: the search never leaves τ = 1.0.
  params, palu, report = eigen_params(
      cfg, base, stats, model, inputs, EigenConfig(eps=1e-12, multiple=1))
  assert palu.k_ranks == ((16, 16),) * cfg.n_layers == palu.v_ranks
  tokens = jnp.asarray(_windows(hf["vocab_size"], 2, 20, seed=5))
  np.testing.assert_allclose(
      from_params(cfg, params, dtype=jnp.float32, palu=palu)(tokens)[0],
      model(tokens)[0], atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.5])
def test_budget_mode_hits_the_target(calibrated, ratio):
  model, base, stats, inputs, _ = calibrated
  cfg = model.cfg
  params, palu, report = eigen_params(
      cfg, base, stats, model, inputs,
      EigenConfig(ratio=ratio, multiple=4, floor=0.25))
  dense = kv_bytes_per_token(cfg, None)
  assert report["kv_bytes_per_token"] == kv_bytes_per_token(cfg, palu)
  assert report["kv_bytes_per_token"] == round(dense * (1 - ratio) / 16) * 16
  assert all(r % 4 == 0 and r >= 4 for l in palu.k_ranks + palu.v_ranks
             for r in l)
  m = from_params(cfg, params, dtype=jnp.float32, palu=palu)
  assert m.init_cache(1, 8).nbytes() // 8 == report["kv_bytes_per_token"] * 2


def test_budget_below_the_floor_is_refused(calibrated):
  model, base, stats, inputs, _ = calibrated
  with pytest.raises(ConfigError, match="floor"):
    eigen_params(model.cfg, base, stats, model, inputs,
                 EigenConfig(ratio=0.6, multiple=4))   # floor keeps 8/16


@pytest.mark.parametrize("fields,match", [
    (dict(eps=0), "eps"), (dict(ratio=1.0), "ratio"), (dict(floor=0), "floor"),
    (dict(multiple=5), "multiple"), (dict(step=1.5), "step"),
    (dict(kv_bits=5), "kv_bits"), (dict(kv_bits=4, multiple=4), "quant_group"),
])
def test_bad_eigen_config(fields, match):
  model, _, _ = make_model("gqa_tied")
  with pytest.raises(ConfigError, match=match):
    EigenConfig(**fields).validate(model.cfg)


def test_nan_calibration_is_refused(calibrated):
  model, base, stats, inputs, _ = calibrated
  bad = CalibrationStats(grams=stats.grams * np.nan, tokens=stats.tokens,
                         fisher={})
  with pytest.raises(PaluError, match="layer 0"):
    layer_bases(model.cfg, base, bad)


@pytest.mark.parametrize("kv_bits,hadamard", [(16, False), (4, True)])
def test_incremental_decode_equals_full_forward(calibrated, kv_bits, hadamard):
  model, base, stats, inputs, hf = calibrated
  cfg = model.cfg
  econf = EigenConfig(ratio=0.5, multiple=8, floor=0.45, kv_bits=kv_bits,
                      quant_group=16, hadamard=hadamard)
  params, palu, _ = eigen_params(cfg, base, stats, model, inputs, econf)
  m = from_params(cfg, params, dtype=jnp.float32, palu=palu)
  tokens = jnp.asarray(_windows(hf["vocab_size"], 2, 14, seed=3))
  full, _ = m(tokens)
  cache = m.init_cache(2, 16)
  step_logits = []
  logits, cache = m(tokens[:, :6], cache)
  step_logits.append(logits)
  for t in range(6, 14):
    logits, cache = m(tokens[:, t:t + 1], cache)
    step_logits.append(logits)
  np.testing.assert_allclose(jnp.concatenate(step_logits, 1), full,
                             atol=2e-4, rtol=1e-3)
