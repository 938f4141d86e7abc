"""argparse value types and the parser class of the `palu-jax` command.

Numbers are checked when the command line is parsed, so a bad value stops
the command at once with one line naming the flag (exit status 2), before
any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import sys


def _checked(kind, what: str, ok, name: str):
  """An argparse type: text -> kind(text), refused with "must be {what}"
  unless it parses, is finite (floats) and satisfies `ok`."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or (kind is float and not math.isfinite(value)) or \
        not ok(value):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value
  parse.__name__ = name
  return parse


positive_int = _checked(int, "an integer >= 1", lambda v: v >= 1,
                        "positive_int")
nonneg_int = _checked(int, "an integer >= 0", lambda v: v >= 0, "nonneg_int")
positive_float = _checked(float, "a finite number > 0", lambda v: v > 0,
                          "positive_float")
nonneg_float = _checked(float, "a finite number >= 0", lambda v: v >= 0,
                        "nonneg_float")
open_fraction = _checked(float, "a number in (0, 1)", lambda v: 0 < v < 1,
                         "open_fraction")
top_p = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1, "top_p")


def quant_group(text: str) -> int:
  """--quant-group N (latents per scale) or "group": one scale per token and
  latent group (0 in the config)."""
  if text.strip().lower() == "group":
    return 0
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(
        f"must be an integer >= 1 or 'group', got {text!r}")
  return value


def mesh_spec(text: str) -> str:
  """--mesh data=D,model=M: axis names and sizes checked when parsed (the
  device count when the mesh is built)."""
  from palu_jax.errors import ConfigError
  from palu_jax.sharding.mesh import spec_devices
  try:
    spec_devices(text)
  except ConfigError as e:
    raise argparse.ArgumentTypeError(str(e).removeprefix("mesh: "))
  return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Shows "(default: X)" after each flag's help, except where the default
  is None or a switch's own value, or the help already names it in [...]."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("[" in text or action.default in (None, argparse.SUPPRESS)
        or isinstance(action, (argparse._StoreTrueAction,
                               argparse._StoreFalseAction,
                               argparse._StoreConstAction))
        or not action.option_strings):
      return text
    return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
  """Errors are one line, `palu-jax CMD: error: ...`, exit status 2."""

  def error(self, message):
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
