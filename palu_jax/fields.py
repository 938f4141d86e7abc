"""Type checks of a config dataclass's fields, from its annotations.

`CompressionConfig(ratio="0.5")` should fail at once naming `ratio`, not
deep inside the decomposition with a TypeError. Annotations are read as
strings ("float", "int | None", ...): int fields take ints (not bools),
float fields take finite real numbers, bool fields take bools, str fields
take strings; "| None" admits None.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from palu_jax.errors import ConfigError

_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, numbers.Integral)
            and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, numbers.Real)
              and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def check_field_types(obj, prefix: str = "") -> None:
  """Raises ConfigError naming the first field whose value has the wrong
  type. Fields with other annotations are left to the caller."""
  for field in dataclasses.fields(obj):
    kinds = [k.strip() for k in str(field.type).split("|")]
    value = getattr(obj, field.name)
    if value is None and "None" in kinds:
      continue
    known = [k for k in kinds if k in _KINDS]
    if not known or len(known) != len([k for k in kinds if k != "None"]):
      continue
    if not any(_KINDS[k][1](value) for k in known):
      what = " or ".join(_KINDS[k][0] for k in known)
      raise ConfigError(prefix + field.name, f"must be {what}, got "
                        f"{value!r}")


def require_positive_int(name: str, value) -> None:
  """Raises ConfigError naming `name` unless value is an integer >= 1 (not
  a bool); for plain arguments, as `check_positive` is for fields."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
      or value < 1:
    raise ConfigError(name, f"must be an integer >= 1, got {value!r}")


def check_positive(obj, names, prefix: str = "") -> None:
  """Raises ConfigError unless each named field (if not None) is >= 1."""
  for name in names:
    value = getattr(obj, name)
    if value is not None and value < 1:
      raise ConfigError(prefix + name, f"must be >= 1, got {value}")
