"""llama2.c `.bin` checkpoints (legacy "version 0" and exported version 1).

Layout (see shared/DATA.md): int32 header, then fp32 arrays, matrices
[out, in], Q/K rows in Meta's interleaved-RoPE order.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from convert import keymap
from convert.errors import CheckpointError

V1_MAGIC = 0x616B3432  # "ak42"
_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
           "vocab_size", "seq_len")


def looks_like_llama2c(path: str) -> bool:
  """True for a llama2.c checkpoint (not a pickled/zip PyTorch .bin)."""
  with open(path, "rb") as f:
    head = f.read(8)
  if len(head) < 8 or head[:2] == b"PK" or head[:1] == b"\x80":
    return False
  magic, first = struct.unpack("<iI", head)
  return magic == V1_MAGIC or 0 < magic < 1 << 16


def load_llama2c(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Loads (config, float32 params) from a llama2.c checkpoint."""
  if not os.path.exists(path):
    raise CheckpointError(path, "file does not exist")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(256)
  if len(raw) < 28:
    raise CheckpointError(path, "file is truncated (no llama2.c header)")
  (magic,) = struct.unpack("<I", raw[:4])
  if magic == V1_MAGIC:
    version = struct.unpack("<i", raw[4:8])[0]
    if version != 1:
      raise CheckpointError(path, f"unsupported llama2.c export version "
                            f"{version} (supported: 0, 1)", field="version")
    header = dict(zip(_HEADER, struct.unpack("<7i", raw[8:36])))
    shared = bool(raw[36])
    offset = 256
  else:
    header = dict(zip(_HEADER, struct.unpack("<7i", raw[:28])))
    shared = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])
    offset = 28
  for name, value in header.items():
    if value <= 0:
      raise CheckpointError(path, f"invalid header value {value}", field=name)
  d, f_, n_l = header["dim"], header["hidden_dim"], header["n_layers"]
  n_h, n_kv, v = header["n_heads"], header["n_kv_heads"], header["vocab_size"]
  if d % n_h or n_h % n_kv:
    raise CheckpointError(path, f"dim={d}, n_heads={n_h}, n_kv_heads={n_kv} "
                          "are inconsistent", field="n_heads")
  hd = d // n_h
  kd = n_kv * hd
  layout = [
      ("embed", (v, d)), ("rms_att", (n_l, d)), ("wq", (n_l, d, d)),
      ("wk", (n_l, kd, d)), ("wv", (n_l, kd, d)), ("wo", (n_l, d, d)),
      ("rms_ffn", (n_l, d)), ("w1", (n_l, f_, d)), ("w2", (n_l, d, f_)),
      ("w3", (n_l, f_, d)), ("rms_final", (d,)),
  ]
  if magic != V1_MAGIC:
    # Legacy files carry RoPE tables (run.c skips them).
    layout += [("freq_real", (header["seq_len"], hd // 2)),
               ("freq_imag", (header["seq_len"], hd // 2))]
  if not shared:
    layout.append(("wcls", (v, d)))
  need = offset + 4 * sum(int(np.prod(s)) for _, s in layout)
  if size < need:
    raise CheckpointError(path, f"file is truncated: header implies {need} "
                          f"bytes, file has {size}")
  mm = np.memmap(path, dtype=np.float32, mode="r", offset=offset)
  w, pos = {}, 0
  for name, shape in layout:
    n = int(np.prod(shape))
    w[name] = np.array(mm[pos:pos + n]).reshape(shape)
    pos += n
  cfg = {
      "arch": "llama", "vocab_size": v, "dim": d, "n_layers": n_l,
      "n_heads": n_h, "n_kv_heads": n_kv, "head_dim": hd, "hidden_dim": f_,
      "norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
      "max_seq_len": header["seq_len"], "tie_embeddings": shared,
      "qkv_bias": False, "bos_id": 1, "eos_ids": [2],
  }
  params = {keymap.EMBED: w["embed"], keymap.FINAL_NORM: w["rms_final"]}
  if not shared:
    params[keymap.LM_HEAD] = w["wcls"].T
  for i in range(n_l):
    params.update({
        keymap.ATTN_NORM.format(i=i): w["rms_att"][i],
        keymap.MLP_NORM.format(i=i): w["rms_ffn"][i],
        # Meta's interleaved RoPE -> rotate-half layout.
        keymap.Q_PROJ.format(i=i): keymap.unpermute_rope(w["wq"][i], n_h).T,
        keymap.K_PROJ.format(i=i): keymap.unpermute_rope(w["wk"][i], n_kv).T,
        keymap.V_PROJ.format(i=i): w["wv"][i].T,
        keymap.O_PROJ.format(i=i): w["wo"][i].T,
        keymap.GATE_PROJ.format(i=i): w["w1"][i].T,
        keymap.UP_PROJ.format(i=i): w["w3"][i].T,
        keymap.DOWN_PROJ.format(i=i): w["w2"][i].T,
    })
  keymap.check_params(params, cfg, path)
  return cfg, params
