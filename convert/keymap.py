"""Canonical parameter names shared by every loader and by the Flax model.

Every loader returns a flat dict ``{canonical_key: np.ndarray}``. The keys are
the '.'-joined paths of the `palu_jax` NNX model state, so loading is a plain
unflatten. Matrices are stored ``[in, out]`` (``y = x @ W``); Q/K projections
are in the Hugging Face "rotate-half" RoPE layout.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from convert.errors import CheckpointError

EMBED = "embed.embedding"            # [V, D]
FINAL_NORM = "final_norm.scale"      # [D]
LM_HEAD = "lm_head.kernel"           # [D, V]; absent when tied

# Per-layer names (format with layer index i).
ATTN_NORM = "layers.{i}.attn_norm.scale"          # [D]
Q_PROJ = "layers.{i}.attn.q_proj.kernel"          # [D, N*H]
K_PROJ = "layers.{i}.attn.k_proj.kernel"          # [D, K*H]
V_PROJ = "layers.{i}.attn.v_proj.kernel"          # [D, K*H]
O_PROJ = "layers.{i}.attn.o_proj.kernel"          # [N*H, D]
Q_BIAS = "layers.{i}.attn.q_proj.bias"            # [N*H]
K_BIAS = "layers.{i}.attn.k_proj.bias"            # [K*H]
V_BIAS = "layers.{i}.attn.v_proj.bias"            # [K*H]
MLP_NORM = "layers.{i}.mlp_norm.scale"            # [D]
GATE_PROJ = "layers.{i}.mlp.gate_proj.kernel"     # [D, F]
UP_PROJ = "layers.{i}.mlp.up_proj.kernel"         # [D, F]
DOWN_PROJ = "layers.{i}.mlp.down_proj.kernel"     # [F, D]


def expected_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The exact set of canonical keys and shapes a config implies."""
  d, f, v = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
  qd = cfg["n_heads"] * cfg["head_dim"]
  kd = cfg["n_kv_heads"] * cfg["head_dim"]
  shapes = {EMBED: (v, d), FINAL_NORM: (d,)}
  if not cfg["tie_embeddings"]:
    shapes[LM_HEAD] = (d, v)
  for i in range(cfg["n_layers"]):
    layer = {
        ATTN_NORM: (d,), Q_PROJ: (d, qd), K_PROJ: (d, kd), V_PROJ: (d, kd),
        O_PROJ: (qd, d), MLP_NORM: (d,), GATE_PROJ: (d, f), UP_PROJ: (d, f),
        DOWN_PROJ: (f, d),
    }
    if cfg["qkv_bias"]:
      layer.update({Q_BIAS: (qd,), K_BIAS: (kd,), V_BIAS: (kd,)})
    shapes.update({k.format(i=i): s for k, s in layer.items()})
  return shapes


def check_params(params: Mapping[str, np.ndarray], cfg: Mapping[str, Any],
                 path) -> None:
  """Raises CheckpointError on missing/unknown keys or shape mismatches."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(params))
  if missing:
    raise CheckpointError(path, f"missing {len(missing)} tensor(s), e.g. "
                          f"{missing[:3]}", field=missing[0])
  unknown = sorted(set(params) - set(want))
  if unknown:
    raise CheckpointError(path, f"unexpected tensor(s) {unknown[:3]}",
                          field=unknown[0])
  for key, shape in want.items():
    if tuple(params[key].shape) != shape:
      raise CheckpointError(
          path, f"shape {tuple(params[key].shape)} does not match the config, "
          f"which implies {shape}", field=key)


def source_name(canonical: str, rules: list[tuple[str, str]]) -> str:
  """The source-format name of a canonical key (inverse of the rules)."""
  for src, dst in rules:
    rx = re.escape(dst).replace(re.escape("{i}"), r"(\d+)") + "$"
    m = re.match(rx, canonical)
    if m:
      name = src.replace(r"(\d+)", m.group(1)) if m.groups() else src
      return name.replace("\\.", ".")
  return canonical


def check_mapped(params: Mapping[str, np.ndarray],
                 named: Mapping[str, tuple[str, Any]], cfg: Mapping[str, Any],
                 path_of: Callable[[str | None], str],
                 rules: list[tuple[str, str]]) -> None:
  """`check_params`, but errors name the *source* tensor and its file.

  Args:
    named: canonical key -> (source key, tensor), as `map_keys` returns.
    path_of: source key (or None) -> the file that holds it.
    rules: the `map_keys` rules, to name tensors that are missing.
  """
  try:
    check_params(params, cfg, path_of(None))
  except CheckpointError as e:
    src = (named[e.field][0] if e.field in named
           else source_name(e.field, rules))
    raise CheckpointError(path_of(src), e.reason, field=src) from None


def map_keys(tensors: Mapping[str, Any],
             rules: list[tuple[str, str]],
             path,
             ignore: Callable[[str], bool] = lambda k: False,
             ) -> dict[str, tuple[str, Any]]:
  """Renames source keys to canonical keys with regex rules.

  Args:
    tensors: source name -> tensor (any object).
    rules: (source regex, canonical template) pairs; the template may use
      ``{i}`` for the first regex group (the layer index).
    path: file named in errors.
    ignore: source keys to drop silently (e.g. rotary caches).

  Returns:
    canonical key -> (source key, tensor).
  """
  compiled = [(re.compile(src + "$"), dst) for src, dst in rules]
  out = {}
  for name, tensor in tensors.items():
    if ignore(name):
      continue
    for rx, dst in compiled:
      m = rx.match(name)
      if m:
        out[dst.format(i=int(m.group(1))) if m.groups() else dst] = (name, tensor)
        break
    else:
      raise CheckpointError(path, "unknown tensor name; is this a Llama-family "
                            "checkpoint?", field=name)
  return out


def unpermute_rope(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta/GGUF interleaved-RoPE row order -> HF rotate-half row order.

  Args:
    w_out_in: [n_heads * head_dim, in] (or [n_heads * head_dim] for a bias).
  """
  rows = w_out_in.shape[0]
  hd = rows // n_heads
  rest = w_out_in.shape[1:]
  w = w_out_in.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2)
  return w.reshape(rows, *rest)
