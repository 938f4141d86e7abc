"""Converted model directories: round trip, atomic writes, clear errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref
import writers
from palu_jax import checkpoint
from palu_jax.api import load_model
from palu_jax.errors import CheckpointError
from variants import VARIANTS

HF = VARIANTS["qwen2_bias"]


@pytest.fixture
def src(tmp_path):
  d = tmp_path / "hf"
  writers.write_hf_dir(str(d), HF, numpy_ref.random_hf_weights(HF))
  return d


def test_convert_and_load_round_trip(tmp_path, src):
  out = checkpoint.convert_checkpoint(str(src), str(tmp_path / "conv"))
  assert checkpoint.read_marker(out)["kind"] == "base"
  a, _ = load_model(str(src), dtype="float32")
  b, _ = load_model(out, dtype="float32")
  tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
  np.testing.assert_array_equal(a(tokens)[0], b(tokens)[0])
  assert a.cfg == b.cfg


def test_relative_paths(tmp_path, src, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoint.convert_checkpoint("hf", "conv")
  cfg, params, meta = checkpoint.load_model_dir("conv")
  assert meta["kind"] == "base" and cfg.n_layers == HF["num_hidden_layers"]


def test_existing_output_is_not_clobbered(tmp_path, src):
  out = tmp_path / "conv"
  checkpoint.convert_checkpoint(str(src), str(out))
  with pytest.raises(CheckpointError, match="already exists"):
    checkpoint.convert_checkpoint(str(src), str(out))
  checkpoint.convert_checkpoint(str(src), str(out), overwrite=True)
  assert checkpoint.is_model_dir(str(out))


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path, src,
                                                         monkeypatch):
  import orbax.checkpoint as ocp
  out = tmp_path / "conv"

  def boom(self, *a, **k):
    raise KeyboardInterrupt("simulated kill during the parameter write")
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.convert_checkpoint(str(src), str(out))
  assert not out.exists()
  assert os.listdir(tmp_path) == ["hf"]  # no temp directory left behind


def test_directory_without_marker_is_refused(tmp_path, src):
  out = checkpoint.convert_checkpoint(str(src), str(tmp_path / "conv"))
  os.remove(os.path.join(out, checkpoint.MARKER))
  with pytest.raises(CheckpointError, match="not a palu-jax model"):
    checkpoint.load_model_dir(out)


def test_damaged_params_are_reported(tmp_path, src):
  out = checkpoint.convert_checkpoint(str(src), str(tmp_path / "conv"))
  import shutil
  shutil.rmtree(os.path.join(out, "params"))
  with pytest.raises(CheckpointError, match="params"):
    checkpoint.load_model_dir(out)
