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


# Measured (eval/results/config_table.md): SmolLM2-135M WikiText-2
# perplexity; decode tokens/s of the Llama-2-7B shape at 64K, batch 1, H200.
PRESETS: dict[str, Preset] = {
    # per-head latents: the least key-rebuild work per byte read, the
    # fastest configuration at 64K (1.38× the dense model; groups of 2 KV
    # heads 1.22×, of 4 0.83×) and on the speed/quality front, at a large
    # quality cost on models with few KV heads (SmolLM2: 46.9 vs 24.1)
    "fast": Preset({"ratio": 0.5, "mode": "mlrd"},
                   "fastest decode at long context (per-head latents)"),
    # the default decomposition at 50 %: half the cache (twice the context
    # in the same memory), 16-bit latents that the Mosaic GPU kernel reads
    "balanced": Preset({"ratio": 0.5},
                       "half the cache, 16-bit latents on the fast kernel"),
    # fp8 latents and an e4m3 B_k cost +1.5 % perplexity over bf16 latents
    # (SmolLM2 50 %: 24.43 vs 24.08; fp8 latents alone +0.9 %) at half
    # their bytes; the Mosaic GPU kernel decodes them at 0.75× of the dense
    # model at 64K (bf16 latents 0.83×). Its fp8 key rebuild multiplies an
    # e4m3 B_k: with B_k in 16 bits RoPE calls fall back (Triton, ~0.1×)
    "small": Preset({"ratio": 0.5, "kv_bits": 8, "k_up_bits": 8,
                     "multiple": 32},
                    "a quarter of the dense cache, +1.5 % perplexity "
                    "(float8 latents and B_k)"),
}


def preset_fields(name: str) -> dict[str, Any]:
  """The CompressionConfig fields of preset `name` (a copy)."""
  if name not in PRESETS:
    raise ConfigError("preset", f"{name!r} is not one of {sorted(PRESETS)}")
  return dict(PRESETS[name].fields)
