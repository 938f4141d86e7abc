"""Hugging Face checkpoint directories: config.json + (sharded) safetensors.

Supports Llama (incl. Llama-3.x `llama3` RoPE scaling), Mistral and Qwen2
(q/k/v bias), tied or untied embeddings, fp32/fp16/bf16 weights.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from convert import keymap
from convert.errors import CheckpointError
from convert.safetensors_io import read_safetensors

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

_RULES = [
    (r"model\.embed_tokens\.weight", keymap.EMBED),
    (r"model\.norm\.weight", keymap.FINAL_NORM),
    (r"lm_head\.weight", keymap.LM_HEAD),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", keymap.ATTN_NORM),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", keymap.MLP_NORM),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", keymap.Q_PROJ),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", keymap.K_PROJ),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", keymap.V_PROJ),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", keymap.O_PROJ),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", keymap.Q_BIAS),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", keymap.K_BIAS),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", keymap.V_BIAS),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", keymap.GATE_PROJ),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", keymap.UP_PROJ),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", keymap.DOWN_PROJ),
]


def _ignored(name: str) -> bool:
  return name.endswith("rotary_emb.inv_freq")


def _require(hf: dict, key: str, path: str):
  if key not in hf:
    raise CheckpointError(path, "required field is missing", field=key)
  return hf[key]


def _positive_ints(hf: dict, path: str) -> None:
  """The size fields a model is built from must be positive integers."""
  for key in ("num_attention_heads", "hidden_size", "num_hidden_layers",
              "intermediate_size", "vocab_size", "num_key_value_heads",
              "head_dim", "max_position_embeddings"):
    value = hf.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CheckpointError(path, f"must be a positive integer, got "
                            f"{value!r}", field=key)


def config_from_hf(hf: dict[str, Any], path: str) -> dict[str, Any]:
  """Maps a transformers config.json dict to the canonical config dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        path, f"unsupported architecture {model_type!r} "
        f"(architectures={hf.get('architectures')}); supported model_type: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}", field="model_type")
  _positive_ints(hf, path)
  n_heads = _require(hf, "num_attention_heads", path)
  dim = _require(hf, "hidden_size", path)
  # transformers >= 5 moves theta and scaling into `rope_parameters`.
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in
                                       (None, "default") else None)
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_scaling = None
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("llama3", "default"):
      raise CheckpointError(path, f"unsupported RoPE scaling type {kind!r} "
                            "(supported: llama3)", field="rope_scaling")
    if kind == "llama3":
      rope_scaling = {k: float(scaling[k]) for k in (
          "factor", "low_freq_factor", "high_freq_factor",
          "original_max_position_embeddings")}
  eos = hf.get("eos_token_id")
  eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  return {
      "arch": model_type,
      "vocab_size": _require(hf, "vocab_size", path),
      "dim": dim,
      "n_layers": _require(hf, "num_hidden_layers", path),
      "n_heads": n_heads,
      "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
      "head_dim": hf.get("head_dim") or dim // n_heads,
      "hidden_dim": _require(hf, "intermediate_size", path),
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "rope_theta": float(theta),
      "rope_scaling": rope_scaling,
      "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "qkv_bias": model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      "bos_id": hf.get("bos_token_id"),
      "eos_ids": eos_ids,
  }


def _shard_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(index, f"corrupt shard index: {e}",
                            field="weight_map") from e
    files = sorted({os.path.join(directory, v) for v in weight_map.values()})
    for f in files:
      if not os.path.exists(f):
        raise CheckpointError(f, "shard listed in "
                              "model.safetensors.index.json is missing")
    return files
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    pickled = [n for n in os.listdir(directory)
               if n in PICKLE_NAMES or n.endswith((".pt", ".pth", ".bin"))]
    if pickled:
      raise CheckpointError(
          os.path.join(directory, pickled[0]),
          "pickled PyTorch checkpoints are refused (unpickling runs arbitrary "
          "code); convert it to safetensors first, e.g. with "
          "`transformers` save_pretrained(..., safe_serialization=True)")
    raise CheckpointError(directory, "no *.safetensors weights found")
  return files


def load_hf_dir(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Loads (config, params) from a Hugging Face checkpoint directory."""
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(cfg_path, "config.json is missing from the "
                          "checkpoint directory")
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(cfg_path, f"invalid JSON: {e}") from e
  if not isinstance(hf, dict):
    raise CheckpointError(cfg_path, f"must hold a JSON object, got a "
                          f"{type(hf).__name__}")
  cfg = config_from_hf(hf, cfg_path)
  tensors: dict[str, np.ndarray] = {}
  where: dict[str, str] = {}
  for shard in _shard_files(directory):
    for name, arr in read_safetensors(shard).items():
      tensors[name] = arr
      where[name] = shard
  named = keymap.map_keys(tensors, _RULES, directory, ignore=_ignored)
  if cfg["tie_embeddings"] and keymap.LM_HEAD in named:
    # Some exports store the tied head anyway; it must equal the embedding.
    named.pop(keymap.LM_HEAD)
  if not cfg["tie_embeddings"] and keymap.LM_HEAD not in named:
    raise CheckpointError(cfg_path, "tie_word_embeddings is false but "
                          "lm_head.weight is missing", field="tie_word_embeddings")
  params = {}
  for key, (src, arr) in named.items():
    arr = np.asarray(arr)
    params[key] = arr.T if arr.ndim == 2 and key != keymap.EMBED else arr
  keymap.check_mapped(params, named, cfg,
                      lambda src: where.get(src, directory),
                      _RULES)
  return cfg, params
