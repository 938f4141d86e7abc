"""Shape notation used in docstrings, comments and einsum strings.

  B  batch                      T  new tokens in this call
  S  cache length (max_len)     D  model width
  N  query heads                K  key/value heads
  G  query heads per KV head (N // K)
  H  head dim                   F  MLP hidden width
  V  vocabulary                 L  layers
  R  latent rank (Palu)
"""

from __future__ import annotations

import jax

Array = jax.Array
