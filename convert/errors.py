"""Errors raised while reading checkpoints and tokenizers.

`convert/` is a leaf package, so the error hierarchy of the whole library is
rooted here and re-exported by `palu_jax.errors`.
"""

from __future__ import annotations

import os


class PaluError(Exception):
  """Base class of every error palu_jax raises on purpose."""


class CheckpointError(PaluError, ValueError):
  """A checkpoint or tokenizer file is missing, malformed or unsupported.

  The message always names the offending file and, where there is one, the
  field (config key, tensor name, header entry).
  """

  def __init__(self, path: str | os.PathLike | None, message: str,
               field: str | None = None):
    self.path = None if path is None else os.fspath(path)
    self.field = field
    self.reason = message
    where = f"{self.path}" if self.path else "<input>"
    if field:
      where += f" [{field}]"
    super().__init__(f"{where}: {message}")
