"""Writers of tiny checkpoints in each source format, for round-trip tests.

They use the formats' own libraries where one exists (safetensors, gguf)
and the documented llama2.c layout otherwise.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_NP_DTYPES = {"float32": np.float32, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}


def write_hf_dir(path: str, cfg: dict, weights: dict[str, np.ndarray], *,
                 dtype: str = "float32", shards: int = 1) -> dict[str, np.ndarray]:
  """Writes config.json + safetensors (optionally sharded with an index).

  Returns the weights as actually stored (after the dtype cast), as float32.
  """
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  cast = {k: v.astype(_NP_DTYPES[dtype]) for k, v in weights.items()}
  names = sorted(cast)
  if shards == 1:
    save_file(cast, os.path.join(path, "model.safetensors"))
  else:
    weight_map = {}
    for s in range(shards):
      fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: cast[n] for n in names[s::shards]}
      save_file(part, os.path.join(path, fname))
      weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return {k: v.astype(np.float32) for k, v in cast.items()}


def hf_to_meta_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF rotate-half row order -> Meta interleaved order (GGUF, llama2.c)."""
  rows = w.shape[0]
  hd = rows // n_heads
  return (w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(rows, *w.shape[1:]))


def meta_weights(w: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
  """HF-named weights with Q/K (and biases) in Meta interleaved order."""
  out = dict(w)
  for name, arr in w.items():
    if ".q_proj." in name:
      out[name] = hf_to_meta_rope(arr, cfg["num_attention_heads"])
    elif ".k_proj." in name:
      out[name] = hf_to_meta_rope(arr, cfg["num_key_value_heads"])
  return out


def write_gguf(path: str, cfg: dict, weights: dict[str, np.ndarray], *,
               quant: str = "F32", tokens: list[str] | None = None,
               skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Writes a llama-architecture GGUF with the gguf package's writer.

  Matrices are quantized to `quant` (F32, F16, Q8_0 or Q4_1 via
  gguf.quants.quantize). Returns the Meta-layout weights as stored, dequantized.
  """
  import gguf
  meta = meta_weights(weights, cfg)
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(cfg["num_hidden_layers"])
  writer.add_context_length(cfg["max_position_embeddings"])
  writer.add_embedding_length(cfg["hidden_size"])
  writer.add_feed_forward_length(cfg["intermediate_size"])
  writer.add_head_count(cfg["num_attention_heads"])
  writer.add_head_count_kv(cfg["num_key_value_heads"])
  writer.add_rope_freq_base(cfg["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  writer.add_vocab_size(cfg["vocab_size"])
  if cfg.get("head_dim"):
    writer.add_rope_dimension_count(cfg["head_dim"])
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
  stored = {}
  qtype = getattr(gguf.GGMLQuantizationType, quant)
  for name, arr in meta.items():
    if name in names:
      gname = names[name]
    else:
      layer, rest = name[len("model.layers."):].split(".", 1)
      mod, kind = rest.rsplit(".", 1)
      gname = f"blk.{layer}.{sub[mod]}.{kind}"
    if gname in skip:
      continue
    if arr.ndim == 2 and quant != "F32":
      q = gguf.quants.quantize(arr, qtype)
      writer.add_tensor(gname, q, raw_dtype=qtype)
      stored[name] = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
    else:
      writer.add_tensor(gname, arr)
      stored[name] = arr
  if tokens is not None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(-i) for i in range(len(tokens))])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def write_llama2c(path: str, cfg: dict, weights: dict[str, np.ndarray]) -> None:
  """Writes a legacy (version 0) llama2.c checkpoint; Q/K in Meta order."""
  m = meta_weights(weights, cfg)
  L = cfg["num_hidden_layers"]
  tied = cfg.get("tie_word_embeddings", False)
  hd = cfg["hidden_size"] // cfg["num_attention_heads"]
  seq = cfg["max_position_embeddings"]
  def stack(suffix):
    return np.stack([m[f"model.layers.{i}.{suffix}"] for i in range(L)])
  header = struct.pack("<7i", cfg["hidden_size"], cfg["intermediate_size"], L,
                       cfg["num_attention_heads"], cfg["num_key_value_heads"],
                       cfg["vocab_size"] if tied else -cfg["vocab_size"], seq)
  arrays = [m["model.embed_tokens.weight"], stack("input_layernorm.weight"),
            stack("self_attn.q_proj.weight"), stack("self_attn.k_proj.weight"),
            stack("self_attn.v_proj.weight"), stack("self_attn.o_proj.weight"),
            stack("post_attention_layernorm.weight"),
            stack("mlp.gate_proj.weight"), stack("mlp.down_proj.weight"),
            stack("mlp.up_proj.weight"), m["model.norm.weight"],
            np.zeros((seq, hd // 2)), np.zeros((seq, hd // 2))]
  if not tied:
    arrays.append(m["lm_head.weight"])
  with open(path, "wb") as f:
    f.write(header)
    for a in arrays:
      f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
