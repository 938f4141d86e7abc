"""LoRA fine-tuning: adapters, training, checkpoints, merging, CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress_tests.test_compress import _fake_stats
from conftest import shared_path
from model_tests.test_latent_model import _base_params
from model_tests.test_model import make_model
from palu_jax import compress as C
from palu_jax.errors import ConfigError, PaluError
from palu_jax.lora.adapters import LoraConfig, find_targets, init_adapters, merge
from palu_jax.lora.data import batch_at, pack
from palu_jax.lora.train import LoraTrainer, TrainConfig, with_adapters
from palu_jax.model import from_params
from palu_jax.quantize.int_quant import fake_quantize


def _compressed(kv_bits=16):
  model, _, _ = make_model("gqa_tied")
  comp = C.CompressionConfig(ratio=0.5, multiple=4, kv_bits=kv_bits,
                             quant_group=16, hadamard=kv_bits < 16)
  params, palu, _ = C.compress_params(model.cfg, _base_params(model),
                                      _fake_stats(model), comp)
  return model.cfg, params, palu


def _sequences(n=16, t=32, seed=0):
  """Every odd token repeats the one before it: a pattern LoRA can learn."""
  s = np.random.default_rng(seed).integers(0, 97, (n, t)).astype(np.int32)
  s[:, 1::2] = s[:, ::2]
  return s


TRAIN = TrainConfig(steps=8, lr=1e-2, warmup=1, batch_size=4, grad_accum=2,
                    seqlen=32, compute_dtype="float32", checkpoint_every=2)


@pytest.fixture(scope="module")
def compressed():
  return _compressed()


def test_default_targets_and_errors(compressed):
  cfg, params, palu = compressed
  found = find_targets(params, LoraConfig())
  assert sorted({n.split(".", 3)[-1] for n in found}) == [
      "k_down", "k_up", "o_latent"]          # shared latent: no v_down
  dense = _base_params(make_model("gqa_tied")[0])
  assert {n.split(".", 3)[-1] for n in find_targets(dense, LoraConfig())} == {
      "q_proj.kernel", "k_proj.kernel", "v_proj.kernel", "o_proj.kernel"}
  assert len(find_targets(dense, LoraConfig(targets=("mlp.down_proj",)))) == 2
  with pytest.raises(ConfigError, match="'w_q' matches no parameter"):
    find_targets(params, LoraConfig(targets=("w_q",)))
  with pytest.raises(ConfigError, match="33 exceeds layers.0.attn.k_down's "
                     r"smaller side \(64x32\)"):
    find_targets(params, LoraConfig(rank=33))
  with pytest.raises(ConfigError, match="rank"):
    find_targets(params, LoraConfig(rank=0))


def test_zero_initialised_adapters_leave_the_model_unchanged(compressed):
  cfg, params, palu = compressed
  lora = LoraConfig(rank=4)
  adapters = init_adapters(find_targets(params, lora), lora)
  assert all(np.any(np.asarray(a["a"]) != 0) and not np.any(np.asarray(a["b"]))
             for a in adapters.values())
  merged = merge(params, adapters, lora)
  for n in params:
    np.testing.assert_array_equal(merged[n], params[n])
  trainer = LoraTrainer(cfg, params, palu, lora, TRAIN)
  tokens = jnp.asarray(_sequences(2, 12))
  ref, _ = from_params(cfg, params, dtype=jnp.float32, palu=palu)(tokens)
  got, _ = with_adapters(trainer._graphdef, *trainer.frozen, adapters,
                         lora.scale, jnp.float32)(tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_loss_decreases_and_merged_equals_unmerged(compressed):
  cfg, params, palu = compressed
  lora = LoraConfig(rank=4)
  trainer = LoraTrainer(cfg, params, palu, lora, TRAIN)
  adapters, losses = trainer.fit(_sequences(), progress=False)
  assert losses[-2:].mean() < 0.8 * losses[:2].mean()
  assert any(np.any(np.asarray(a["b"]) != 0) for a in adapters.values())
  tokens = jnp.asarray(_sequences(2, 12, seed=1))
  unmerged, _ = with_adapters(trainer._graphdef, *trainer.frozen, adapters,
                              lora.scale, jnp.float32)(tokens)
  merged, _ = from_params(cfg, merge(params, adapters, lora),
                          dtype=jnp.float32, palu=palu)(tokens)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
  ref, _ = from_params(cfg, params, dtype=jnp.float32, palu=palu)(tokens)
  assert not np.allclose(merged, ref, atol=1e-3)    # it did change


def test_interrupted_run_resumes_bit_identically(compressed, tmp_path):
  cfg, params, palu = compressed
  lora = LoraConfig(rank=4)
  seqs = _sequences()
  whole, whole_losses = LoraTrainer(cfg, params, palu, lora, TRAIN).fit(
      seqs, progress=False)
  ckpt = str(tmp_path / "run")
  LoraTrainer(cfg, params, palu, lora, TRAIN).fit(
      seqs, checkpoint_dir=ckpt, stop_after=5, progress=False)
  saved = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert saved == [2, 4]            # periodic; step 5 was never saved
  again, again_losses = LoraTrainer(cfg, params, palu, lora, TRAIN).fit(
      seqs, checkpoint_dir=ckpt, progress=False)
  for name in whole:
    for part in ("a", "b"):
      np.testing.assert_array_equal(np.asarray(again[name][part]),
                                    np.asarray(whole[name][part]))
  np.testing.assert_array_equal(again_losses, whole_losses)
  assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [4, 6, 8]
  # A directory written with other settings is refused, not mixed in.
  other = TrainConfig(**{**TRAIN.to_dict(), "lr": 5e-3})
  with pytest.raises(ConfigError, match="other settings"):
    LoraTrainer(cfg, params, palu, lora, other).fit(seqs, checkpoint_dir=ckpt,
                                                    progress=False)


def test_quantized_cache_trains_through_the_straight_through_estimator():
  x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
  w = jnp.arange(64.0).reshape(2, 32)
  g = jax.grad(lambda v: jnp.sum(fake_quantize(v, bits=3, group=16) * w))(x)
  np.testing.assert_array_equal(g, w)
  cfg, params, palu = _compressed(kv_bits=4)
  trainer = LoraTrainer(cfg, params, palu, LoraConfig(rank=4), TRAIN)
  state = trainer.init_state()
  grads = jax.grad(trainer.loss, argnums=1)(
      trainer.frozen, state["adapters"], jnp.asarray(_sequences(2)))
  # B starts at zero, so its gradient carries the signal; the latent's
  # down-projection must receive one through the quantized cache.
  assert float(jnp.abs(grads["layers.0.attn.k_down"]["b"]).sum()) > 0


def test_packing_and_batch_order():
  seqs = pack(np.arange(100), 8)
  assert seqs.shape == (12, 8) and seqs[1, 0] == 8
  with pytest.raises(PaluError, match="fewer than one sequence"):
    pack(np.arange(5), 8)
  # One epoch visits every sequence once; the order depends on seed only.
  epoch = np.concatenate([batch_at(seqs, s, 4, seed=3) for s in range(3)])
  assert sorted(epoch[:, 0].tolist()) == sorted(seqs[:, 0].tolist())
  np.testing.assert_array_equal(batch_at(seqs, 5, 4, 3), batch_at(seqs, 5, 4, 3))
  assert not np.array_equal(batch_at(seqs, 0, 4, 3), batch_at(seqs, 0, 4, 4))


@pytest.mark.parametrize("fields,match", [
    (dict(grad_accum=3), "grad_accum"), (dict(warmup=8), "warmup"),
    (dict(lr=0.0), "lr"), (dict(compute_dtype="int8"), "compute_dtype"),
    (dict(steps=0), "steps")])
def test_bad_train_config(fields, match):
  with pytest.raises(ConfigError, match=match):
    TrainConfig(**{**TRAIN.to_dict(), **fields}).validate()


def test_finetune_cli_writes_a_merged_model(tmp_path, capsys):
  from eval.cli import main
  from palu_jax.api import load_model
  from palu_jax.checkpoint import load_source
  from palu_jax.lora.pipeline import load_adapters
  src = shared_path("models/stories260K/stories260K.bin")
  out = tmp_path / "ft"
  assert main(["finetune", src, "--out", str(out), "--steps", "4",
               "--warmup", "1", "--batch-size", "2", "--seqlen", "64",
               "--dataset", "tinystories", "--dtype", "float32",
               "--checkpoint-every", "2", "--rank", "4"]) == 0
  assert "4 steps, 512 tokens" in capsys.readouterr().out
  with open(out / "train_log.json") as f:
    log = json.load(f)
  assert len(log["losses"]) == 4 and log["targets"]
  assert (out / "loss.png").stat().st_size > 1000
  assert sorted(os.listdir(str(out) + ".ckpt")) == ["2", "4", "run.json"]
  # The saved merge equals merging the saved adapters onto the source.
  adapters, lora = load_adapters(str(out))
  _, base, _ = load_source(src)
  _, saved, meta = load_source(str(out))
  assert meta["lora"]["steps"] == 4
  want = merge(base, adapters, lora)
  for n in want:
    np.testing.assert_allclose(saved[n], want[n], rtol=1e-6, atol=1e-7)
  model, tok = load_model(str(out), dtype="float32")
  assert np.all(np.isfinite(np.asarray(model(jnp.asarray([[1, 2, 3]]))[0])))
  assert main(["finetune", src, "--out", str(out), "--steps", "4",
               "--warmup", "1"]) == 2
  assert "already exists" in capsys.readouterr().err
  assert main(["finetune", src, "--out", str(tmp_path / "x"), "--targets",
               "nope", "--dataset", "tinystories", "--dtype",
               "float32"]) == 2
  assert "'nope' matches no parameter" in capsys.readouterr().err
