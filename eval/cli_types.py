"""argparse value types and the parser class of the `palu-jax` command.

Numbers are checked when the command line is parsed, so a bad value stops
the command at once with one line naming the flag (exit status 2), before
any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import sys


def _number(kind, text: str, what: str):
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  value = _number(int, text, "an integer >= 1")
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return value


def nonneg_int(text: str) -> int:
  value = _number(int, text, "an integer >= 0")
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return value


def finite_float(text: str) -> float:
  return _number(float, text, "a finite number")


def positive_float(text: str) -> float:
  value = _number(float, text, "a finite number > 0")
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got "
                                     f"{text!r}")
  return value


def nonneg_float(text: str) -> float:
  value = _number(float, text, "a finite number >= 0")
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got "
                                     f"{text!r}")
  return value


def open_fraction(text: str) -> float:
  """A number in (0, 1)."""
  value = _number(float, text, "a number in (0, 1)")
  if not 0 < value < 1:
    raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got "
                                     f"{text!r}")
  return value


def top_p(text: str) -> float:
  """A number in (0, 1]."""
  value = _number(float, text, "a number in (0, 1]")
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got "
                                     f"{text!r}")
  return value


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
