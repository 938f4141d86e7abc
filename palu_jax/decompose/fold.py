"""Assemble a Palu model's parameters from per-group low-rank factors.

The keys' factors are stored as they are (A_k → `k_down`, B_k → `k_up`). The
value up-projection is folded into W_o: query head n of group g reads KV head
j = n // G, so its output map becomes B_v[g][:, j-th head's columns]·W_o[n]
([r_g, D]); attention then mixes value latents and never rebuilds V.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.decompose.svd import LowRank


def fold_value_output(v_parts: Sequence[LowRank], w_o: np.ndarray,
                      cfg: ModelConfig, group_size: int) -> np.ndarray:
  """B_v of every group folded into W_o [N·H, D] -> o_latent [Rv, heads, D].

  heads = group_size·G query heads per group; rows of group g sit at its
  latent slice.
  """
  h, per_kv = cfg.head_dim, cfg.q_per_kv
  heads = group_size * per_kv
  w_o = np.asarray(w_o, np.float64).reshape(cfg.n_heads, h, cfg.dim)
  blocks = []
  for g, part in enumerate(v_parts):
    up = np.asarray(part.up, np.float64)                   # [r, gs·H]
    up = up.reshape(up.shape[0], group_size, h)            # [r, gs, H]
    folded = np.empty((up.shape[0], heads, cfg.dim))
    for local in range(heads):
      n = g * heads + local
      folded[:, local] = up[:, local // per_kv] @ w_o[n]
    blocks.append(folded)
  return np.concatenate(blocks, axis=0)


def value_bias_output(b_v: np.ndarray, w_o: np.ndarray, cfg: ModelConfig
                      ) -> np.ndarray:
  """The v bias, unchanged by softmax averaging, through W_o: [D]."""
  h = cfg.head_dim
  w_o = np.asarray(w_o, np.float64).reshape(cfg.n_heads, h, cfg.dim)
  b_v = np.asarray(b_v, np.float64).reshape(cfg.n_kv_heads, h)
  return sum(b_v[n // cfg.q_per_kv] @ w_o[n] for n in range(cfg.n_heads))


def palu_params(base: Mapping[str, np.ndarray], cfg: ModelConfig,
                group_size: int, k_parts: Sequence[Sequence[LowRank]],
                v_parts: Sequence[Sequence[LowRank]], *,
                shared_kv: bool = False
                ) -> tuple[dict[str, np.ndarray], PaluConfig]:
  """Compressed flat params (float32) and their PaluConfig.

  Args:
    base: canonical flat params of the dense model.
    k_parts, v_parts: [L][groups] factors of each layer's k/v projection.
    shared_kv: k and v factors share their down-projections (one latent).
  """
  out = {k: v for k, v in base.items()
         if not any(f".attn.{m}." in k for m in ("k_proj", "v_proj", "o_proj"))}
  for i, (ks, vs) in enumerate(zip(k_parts, v_parts)):
    pre = f"layers.{i}.attn."
    out[pre + "k_down"] = np.concatenate([np.asarray(p.down) for p in ks], 1)
    out[pre + "k_up"] = np.concatenate([np.asarray(p.up) for p in ks], 0)
    if not shared_kv:
      out[pre + "v_down"] = np.concatenate([np.asarray(p.down) for p in vs], 1)
    w_o = base[pre + "o_proj.kernel"]
    out[pre + "o_latent"] = fold_value_output(vs, w_o, cfg, group_size)
    if cfg.qkv_bias:
      out[pre + "k_bias"] = np.asarray(base[pre + "k_proj.bias"])
      out[pre + "o_bias"] = value_bias_output(base[pre + "v_proj.bias"], w_o, cfg)
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  palu = PaluConfig(
      group_size=group_size,
      k_ranks=tuple(tuple(int(p.down.shape[1]) for p in ks) for ks in k_parts),
      v_ranks=tuple(tuple(int(p.down.shape[1]) for p in vs) for vs in v_parts),
      shared_kv=shared_kv)
  palu.validate(cfg)
  return out, palu
