"""GGUF files (llama architecture), dequantized with the `gguf` package."""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from convert import keymap
from convert.errors import CheckpointError

_RULES = [
    (r"token_embd\.weight", keymap.EMBED),
    (r"output_norm\.weight", keymap.FINAL_NORM),
    (r"output\.weight", keymap.LM_HEAD),
    (r"blk\.(\d+)\.attn_norm\.weight", keymap.ATTN_NORM),
    (r"blk\.(\d+)\.ffn_norm\.weight", keymap.MLP_NORM),
    (r"blk\.(\d+)\.attn_q\.weight", keymap.Q_PROJ),
    (r"blk\.(\d+)\.attn_k\.weight", keymap.K_PROJ),
    (r"blk\.(\d+)\.attn_v\.weight", keymap.V_PROJ),
    (r"blk\.(\d+)\.attn_output\.weight", keymap.O_PROJ),
    (r"blk\.(\d+)\.attn_q\.bias", keymap.Q_BIAS),
    (r"blk\.(\d+)\.attn_k\.bias", keymap.K_BIAS),
    (r"blk\.(\d+)\.attn_v\.bias", keymap.V_BIAS),
    (r"blk\.(\d+)\.ffn_gate\.weight", keymap.GATE_PROJ),
    (r"blk\.(\d+)\.ffn_up\.weight", keymap.UP_PROJ),
    (r"blk\.(\d+)\.ffn_down\.weight", keymap.DOWN_PROJ),
]

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0,
                   Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def open_gguf(path: str) -> gguf.GGUFReader:
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, OSError, KeyError) as e:
    raise CheckpointError(path, f"not a readable GGUF file (truncated or "
                          f"corrupt?): {e}") from e


def field(reader: gguf.GGUFReader, key: str, path: str, default=None):
  """The decoded value of a GGUF metadata key (raises when required)."""
  f = reader.fields.get(key)
  if f is None:
    if default is not None:
      return default
    raise CheckpointError(path, "required GGUF metadata key is missing",
                          field=key)
  return f.contents()


def _config(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
  arch = field(reader, "general.architecture", path)
  if arch != "llama":
    raise CheckpointError(path, f"unsupported GGUF architecture {arch!r} "
                          "(supported: llama)", field="general.architecture")
  a = arch + "."
  n_heads = int(field(reader, a + "attention.head_count", path))
  dim = int(field(reader, a + "embedding_length", path))
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = field(reader, a + "vocab_size", path,
                default=len(tokens.data) if tokens is not None else None)
  head_dim = int(field(reader, a + "rope.dimension_count", path,
                       default=dim // n_heads))
  names = {t.name for t in reader.tensors}
  bos = reader.fields.get("tokenizer.ggml.bos_token_id")
  eos = reader.fields.get("tokenizer.ggml.eos_token_id")
  return {
      "arch": "llama",
      "vocab_size": int(vocab),
      "dim": dim,
      "n_layers": int(field(reader, a + "block_count", path)),
      "n_heads": n_heads,
      "n_kv_heads": int(field(reader, a + "attention.head_count_kv", path,
                              default=n_heads)),
      "head_dim": head_dim,
      "hidden_dim": int(field(reader, a + "feed_forward_length", path)),
      "norm_eps": float(field(reader, a + "attention.layer_norm_rms_epsilon",
                              path, default=1e-5)),
      "rope_theta": float(field(reader, a + "rope.freq_base", path,
                                default=10000.0)),
      "rope_scaling": None,
      "max_seq_len": int(field(reader, a + "context_length", path,
                               default=2048)),
      "tie_embeddings": "output.weight" not in names,
      "qkv_bias": "blk.0.attn_q.bias" in names,
      "bos_id": None if bos is None else int(bos.contents()),
      "eos_ids": [] if eos is None else [int(eos.contents())],
  }


def _dequantize(t, path: str) -> np.ndarray:
  if t.tensor_type not in SUPPORTED_TYPES:
    raise CheckpointError(path, f"unsupported GGUF quantization type "
                          f"{Q(t.tensor_type).name}", field=t.name)
  # GGUF lists dims innermost first; numpy wants [out, in].
  shape = tuple(int(s) for s in reversed(t.shape))
  arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
  return np.asarray(arr, dtype=np.float32).reshape(shape)


def load_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Loads (config, float32 params) from a llama-architecture GGUF file."""
  if not os.path.exists(path):
    raise CheckpointError(path, "file does not exist")
  reader = open_gguf(path)
  cfg = _config(reader, path)
  if any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise CheckpointError(path, "per-frequency RoPE factors (Llama-3.1-style "
                          "GGUF) are not supported; convert the Hugging Face "
                          "checkpoint instead", field="rope_freqs.weight")
  named = keymap.map_keys({t.name: t for t in reader.tensors}, _RULES, path)
  params = {}
  for key, (src, t) in named.items():
    w = _dequantize(t, path)
    # GGUF stores Q/K rows permuted for interleaved RoPE; undo it.
    if key.endswith(("q_proj.kernel", "q_proj.bias")):
      w = keymap.unpermute_rope(w, cfg["n_heads"])
    elif key.endswith(("k_proj.kernel", "k_proj.bias")):
      w = keymap.unpermute_rope(w, cfg["n_kv_heads"])
    params[key] = w.T if w.ndim == 2 and key != keymap.EMBED else w
  keymap.check_mapped(params, named, cfg, lambda src: path, _RULES)
  return cfg, params
