"""Output metrics for attention-aware decomposition.

Whitened SVD minimises the error of the projection's *output* ‖X·(W − W')‖.
What the model feels is one step further: a key error δk matters through
the scores q·δk, a value error δv through δv·W_o. Both are quadratic forms
δ·M·Mᵀ·δᵀ, so `svd.factorize(..., out_factor=M)` minimises them exactly.

Keys: scores of a query at i and a key at j ≤ i read qᵀ·R_{j−i}·k (RoPE),
so the metric on δk is E[R_Δᵀ·C·R_Δ] with C = Σ_heads E[qᵀq] (pre-RoPE
queries of the heads sharing the KV head, from the same XᵀX as k/v: q and k
read one input) averaged over causal distances Δ with weight (T − Δ).
Values: Σ_heads W_o[n]·W_o[n]ᵀ over the query heads that read the KV head.
"""

from __future__ import annotations

import numpy as np

from palu_jax.config import ModelConfig
from palu_jax.model.layers import rope_inv_freq


def psd_factor(m: np.ndarray, rel_jitter: float = 1e-6) -> np.ndarray:
  """Lower Cholesky factor of a PSD matrix, jittered relative to its trace."""
  m = 0.5 * (m + m.T)
  eye = np.eye(m.shape[0])
  scale = max(float(np.trace(m)) / m.shape[0], 1e-30)
  for k in range(8):
    try:
      return np.linalg.cholesky(m + scale * rel_jitter * 10 ** k * eye)
    except np.linalg.LinAlgError:
      continue
  raise np.linalg.LinAlgError("output metric is not positive semi-definite")


def rope_rotations(cfg: ModelConfig, distances: np.ndarray) -> np.ndarray:
  """[len(distances), H, H] matrices R with R·k = RoPE of k moved by Δ
  (rotate-half layout, as `layers.apply_rope`)."""
  h, half = cfg.head_dim, cfg.head_dim // 2
  ang = np.asarray(distances, np.float64)[:, None] * rope_inv_freq(cfg)[None]
  cos, sin = np.cos(ang), np.sin(ang)
  rot = np.zeros((len(distances), h, h))
  idx = np.arange(half)
  rot[:, idx, idx] = cos
  rot[:, idx + half, idx + half] = cos
  rot[:, idx, idx + half] = -sin
  rot[:, idx + half, idx] = sin
  return rot


def key_metric(w_q: np.ndarray, gram: np.ndarray, cfg: ModelConfig,
               kv_head: int, seqlen: int, samples: int = 256) -> np.ndarray:
  """[H, H] metric on one KV head's key errors (see module docstring).

  Args:
    w_q: [D, N·H] query kernel; gram: [D, D] XᵀX / tokens of its input.
  """
  h, per_kv = cfg.head_dim, cfg.q_per_kv
  cols = w_q[:, kv_head * per_kv * h:(kv_head + 1) * per_kv * h]
  cols = cols.reshape(w_q.shape[0], per_kv, h).astype(np.float64)
  c = sum(cols[:, n].T @ gram @ cols[:, n] for n in range(per_kv))
  distances = np.unique(np.linspace(0, seqlen - 1, samples).round())
  weights = (seqlen - distances) / np.sum(seqlen - distances)
  rot = rope_rotations(cfg, -distances)           # key before the query
  return np.einsum("t,tah,ab,tbg->hg", weights, rot, c, rot, optimize=True)


def value_metric(w_o: np.ndarray, cfg: ModelConfig, kv_head: int) -> np.ndarray:
  """[H, H] Σ over the KV head's query heads of W_o[n]·W_o[n]ᵀ."""
  h, per_kv = cfg.head_dim, cfg.q_per_kv
  rows = np.asarray(w_o, np.float64).reshape(cfg.n_heads, h, cfg.dim)
  return sum(rows[n] @ rows[n].T
             for n in range(kv_head * per_kv, (kv_head + 1) * per_kv))


def group_factor(metrics: list[np.ndarray]) -> np.ndarray:
  """Block-diagonal lower factor for a group of KV heads' metrics."""
  return block_diag([psd_factor(m) for m in metrics])


def block_diag(blocks: list[np.ndarray]) -> np.ndarray:
  """Square blocks on the diagonal."""
  n = sum(b.shape[0] for b in blocks)
  out = np.zeros((n, n))
  at = 0
  for b in blocks:
    out[at:at + b.shape[0], at:at + b.shape[0]] = b
    at += b.shape[0]
  return out
