"""Errors of palu_jax (the base classes live in the leaf package `convert`)."""

from convert.errors import CheckpointError, PaluError


class ConfigError(PaluError, ValueError):
  """A configuration value is invalid; the message names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"{field}: {message}")


class GenerationError(PaluError, ValueError):
  """Bad generation input: empty prompt, prompt longer than the context, ..."""


__all__ = ["CheckpointError", "ConfigError", "GenerationError", "PaluError"]
