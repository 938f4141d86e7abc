"""Named compression settings, picked from the measured configuration table.

  palu-jax compress MODEL --preset fast|balanced|small --out DIR

Each preset is a set of `CompressionConfig` fields over the defaults;
explicit flags still override them. Where each one sits (perplexity on
SmolLM2-135M against decode tokens/s at 64K on the Llama-2-7B shape, H200)
is in eval/results/config_table.md (`python -m eval.config_table`) and the
README's "Which configuration for which goal".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from palu_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
  fields: Mapping[str, Any]   # CompressionConfig fields over the defaults
  goal: str                   # one line: what it is for


PRESETS: dict[str, Preset] = {
    # per-head latents: the least key-rebuild work per byte read, so the
    # fastest RoPE kernel (Llama-2-7B shape, 64K) at a large quality cost
    # on models with few KV heads
    "fast": Preset({"ratio": 0.5, "mode": "mlrd"},
                   "fastest decode at long context (per-head latents)"),
    # the default decomposition at 50 %: half the cache, bf16 latents the
    # Mosaic GPU kernel reads at full speed
    "balanced": Preset({"ratio": 0.5},
                       "half the cache, 16-bit latents on the fast kernel"),
    # fp8 latents cost nothing measurable in perplexity over bf16 ones
    # (SmolLM2 50 %: 24.077 vs 24.077) at 53 % of their bytes; int4 halves
    # them again for +1.6 %
    "small": Preset({"ratio": 0.5, "kv_bits": 8, "multiple": 32},
                    "smallest cache at no measurable cost over 16-bit "
                    "latents (float8 latents)"),
}


def preset_fields(name: str) -> dict[str, Any]:
  """The CompressionConfig fields of preset `name` (a copy)."""
  if name not in PRESETS:
    raise ConfigError("preset", f"{name!r} is not one of {sorted(PRESETS)}")
  return dict(PRESETS[name].fields)
