"""Head-group low-rank decomposition of a k or v projection (M/G/J-LRD).

The projection W [d, K·H] is split column-wise into groups of `group_size`
KV heads; each group is decomposed on its own: per head (M-LRD, group 1),
per group (G-LRD), or all heads jointly (J-LRD, group K). Groups run over KV
heads, so GQA models work unchanged.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np

from palu_jax.decompose.svd import LowRank, plain_svd, whitened_svd
from palu_jax.errors import ConfigError
from palu_jax.typing import Array


class Mode(enum.Enum):
  MLRD = "mlrd"   # one KV head per group
  GLRD = "glrd"   # `group_size` KV heads per group
  JLRD = "jlrd"   # all KV heads in one group


def resolve_group_size(mode: Mode | str, n_kv_heads: int,
                       group_size: int | None = None) -> int:
  """KV heads per group for a mode (validates G-LRD's group size)."""
  mode = Mode(mode)
  if mode is Mode.MLRD:
    return 1
  if mode is Mode.JLRD:
    return n_kv_heads
  if group_size is None or group_size < 1 or n_kv_heads % group_size:
    raise ConfigError("group_size", f"G-LRD needs a group size dividing "
                      f"n_kv_heads={n_kv_heads}, got {group_size}")
  return group_size


def group_columns(n_kv_heads: int, head_dim: int, group_size: int
                  ) -> list[slice]:
  """Column slices of W [d, K·H], one per group of `group_size` heads."""
  if n_kv_heads % group_size:
    raise ConfigError("group_size", f"{group_size} does not divide "
                      f"n_kv_heads={n_kv_heads}")
  width = group_size * head_dim
  return [slice(g * width, (g + 1) * width)
          for g in range(n_kv_heads // group_size)]


def decompose_projection(w: Array, ranks: Sequence[int], *, n_kv_heads: int,
                         head_dim: int, group_size: int,
                         gram: Array | None = None,
                         jitter: float | None = None) -> list[LowRank]:
  """Decomposes each head group of w [d, K·H] at its rank.

  Args:
    ranks: one rank per group (K // group_size of them).
    gram: XᵀX [d, d] of the projection's inputs for whitened SVD; None for
      plain SVD.

  Returns:
    one LowRank per group: down [d, r_g], up [r_g, group_size·H].
  """
  cols = group_columns(n_kv_heads, head_dim, group_size)
  if len(ranks) != len(cols):
    raise ConfigError("ranks", f"{len(ranks)} ranks for {len(cols)} groups")
  out = []
  for c, r in zip(cols, ranks):
    block = w[:, c]
    out.append(plain_svd(block, r) if gram is None
               else whitened_svd(block, gram, r, jitter=jitter))
  return out


def reconstruct(parts: Sequence[LowRank]) -> np.ndarray:
  """[d, K·H] from per-group factors (for tests and error reports)."""
  return np.concatenate([np.asarray(p.down) @ np.asarray(p.up) for p in parts],
                        axis=1)
