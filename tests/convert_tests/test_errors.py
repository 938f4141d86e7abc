"""Bad input gets a clear palu_jax error naming the file and field."""

import json
import os
import pickle

import numpy as np
import pytest

import numpy_ref
import writers
from convert import CheckpointError, load_checkpoint, load_tokenizer
from variants import VARIANTS

HF = VARIANTS["gqa_tied"]


@pytest.fixture
def hf_dir(tmp_path):
  writers.write_hf_dir(str(tmp_path), HF, numpy_ref.random_hf_weights(HF))
  return tmp_path


def test_missing_paths(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    load_checkpoint(str(tmp_path / "nope.gguf"))
  with pytest.raises(CheckpointError, match="config.json"):
    load_checkpoint(str(tmp_path))


def test_truncated_safetensors(hf_dir):
  path = hf_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match="truncated") as e:
    load_checkpoint(str(hf_dir))
  assert e.value.path == str(path) and e.value.field


def test_missing_shard(tmp_path):
  writers.write_hf_dir(str(tmp_path), HF, numpy_ref.random_hf_weights(HF), shards=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="shard listed"):
    load_checkpoint(str(tmp_path))


def test_unknown_architecture(hf_dir):
  cfg = dict(HF, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unsupported architecture") as e:
    load_checkpoint(str(hf_dir))
  assert e.value.field == "model_type"


def test_missing_config_field(hf_dir):
  cfg = {k: v for k, v in HF.items() if k != "num_attention_heads"}
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(str(hf_dir))
  assert e.value.field == "num_attention_heads"


def test_config_weight_shape_mismatch(hf_dir):
  cfg = dict(HF, intermediate_size=HF["intermediate_size"] + 8)
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="does not match the config") as e:
    load_checkpoint(str(hf_dir))
  assert e.value.field.endswith("mlp.gate_proj.weight")
  assert e.value.path.endswith("model.safetensors")


def test_missing_and_unknown_tensors(tmp_path):
  w = numpy_ref.random_hf_weights(HF)
  del w["model.layers.1.mlp.up_proj.weight"]
  writers.write_hf_dir(str(tmp_path), HF, w)
  with pytest.raises(CheckpointError, match="missing") as e:
    load_checkpoint(str(tmp_path))
  assert e.value.field == "model.layers.1.mlp.up_proj.weight"
  w = numpy_ref.random_hf_weights(HF)
  w["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
  writers.write_hf_dir(str(tmp_path), HF, w)
  with pytest.raises(CheckpointError, match="unknown tensor") as e:
    load_checkpoint(str(tmp_path))
  assert e.value.field == "model.layers.0.mlp.extra.weight"


class _Bomb:
  """Unpickling this creates a file: proof that something was unpickled."""
  def __init__(self, flag):
    self.flag = flag

  def __reduce__(self):
    return (open, (self.flag, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_checkpoints_are_refused_unopened(tmp_path, name):
  flag = tmp_path / "UNPICKLED"
  (tmp_path / "config.json").write_text(json.dumps(HF))
  (tmp_path / name).write_bytes(pickle.dumps(_Bomb(str(flag))))
  with pytest.raises(CheckpointError, match="safetensors"):
    load_checkpoint(str(tmp_path))           # the directory
  with pytest.raises(CheckpointError, match="safetensors"):
    load_checkpoint(str(tmp_path / name))    # the file itself
  assert not flag.exists()


def _bare_gguf(path, arch):
  """A GGUF with one tensor and no model metadata beyond the architecture."""
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_unknown_architecture_and_truncation(tmp_path):
  path = _bare_gguf(tmp_path / "m.gguf", "gpt2")
  with pytest.raises(CheckpointError, match="unsupported GGUF architecture") as e:
    load_checkpoint(str(path))
  assert e.value.field == "general.architecture"
  good = tmp_path / "good.gguf"
  writers.write_gguf(str(good), HF, numpy_ref.random_hf_weights(HF))
  data = good.read_bytes()
  good.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_checkpoint(str(good))


def test_gguf_unsupported_quant_type(tmp_path, monkeypatch):
  from convert import gguf_file
  path = tmp_path / "m.gguf"
  writers.write_gguf(str(path), HF, numpy_ref.random_hf_weights(HF), quant="Q8_0")
  monkeypatch.setattr(gguf_file, "SUPPORTED_TYPES",
                      tuple(t for t in gguf_file.SUPPORTED_TYPES
                            if t != gguf_file.Q.Q8_0))
  with pytest.raises(CheckpointError, match="unsupported GGUF quantization "
                     "type Q8_0") as e:
    load_checkpoint(str(path))
  assert e.value.field.startswith(("blk.", "token_embd", "output"))


def test_gguf_missing_metadata(tmp_path):
  path = _bare_gguf(tmp_path / "m.gguf", "llama")
  with pytest.raises(CheckpointError) as e:
    load_checkpoint(str(path))
  assert e.value.field == "llama.attention.head_count"


def test_llama2c_truncated(tmp_path):
  path = tmp_path / "m.bin"
  writers.write_llama2c(str(path), HF, numpy_ref.random_hf_weights(HF))
  data = path.read_bytes()
  path.write_bytes(data[:-40])
  with pytest.raises(CheckpointError, match="truncated"):
    load_checkpoint(str(path))


def test_tokenizer_errors(tmp_path):
  bad = tmp_path / "tok.bin"
  bad.write_bytes(b"\x07\x00\x00\x00" + b"\x00\x00\x80\x3f\xff\x00\x00\x00ab")
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_tokenizer(str(bad))
  with pytest.raises(CheckpointError, match="no tokenizer found"):
    load_tokenizer(str(tmp_path))
