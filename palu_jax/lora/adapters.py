"""LoRA adapters on a model's flat parameters.

A target parameter W is read as a matrix [in, out]: its last axis is the
output, every earlier axis the input (o_latent [R, N, D] -> [R·N, D], like
the dense W_o [N·H, D]). Its adapter is A [in, r] (random) and B [r, out]
(zeros), so the update ΔW = (alpha/r)·A·B starts at exactly zero.

Default targets on a compressed model: the latent down/up projections and
the folded output map (k_down, k_up, v_down, o_latent); on a dense model the
attention projections.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from palu_jax.errors import ConfigError
from palu_jax.typing import Array

COMPRESSED_TARGETS = ("k_down", "k_up", "v_down", "o_latent")
DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

Adapters = dict[str, dict[str, Array]]   # name -> {"a": [in, r], "b": [r, out]}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoraConfig:
  """rank r, scale alpha/r, and which parameters get adapters (names as in
  the flat params, matched on the part after 'layers.N.': 'k_down',
  'attn.o_latent', 'mlp.down_proj'; None: the defaults for the model)."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] | None = None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["targets"] = None if self.targets is None else list(self.targets)
    return d


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """A parameter's [in, out] view: all leading axes are the input."""
  if len(shape) < 2:
    raise ConfigError("targets", f"a LoRA target must be a matrix or tensor, "
                      f"got shape {shape}")
  return math.prod(shape[:-1]), shape[-1]


def find_targets(params: Mapping[str, Any], lora: LoraConfig
                 ) -> dict[str, tuple[int, ...]]:
  """{flat param name: shape} of every parameter the config targets."""
  if lora.rank < 1:
    raise ConfigError("rank", f"must be >= 1, got {lora.rank}")
  if not lora.alpha > 0:
    raise ConfigError("alpha", f"must be positive, got {lora.alpha}")
  names = sorted(params)
  targets = lora.targets
  if targets is None:
    compressed = any(n.endswith(".k_down") for n in names)
    targets = COMPRESSED_TARGETS if compressed else DENSE_TARGETS
    # v_down exists only with separate key/value latents.
    targets = tuple(t for t in targets if any(_matches(n, t) for n in names))
  if not targets:
    raise ConfigError("targets", "no LoRA targets given")
  found = {}
  for t in targets:
    hits = [n for n in names if _matches(n, t)]
    if not hits:
      kinds = sorted({re.sub(r"^layers\.\d+\.", "", n).removesuffix(".kernel")
                      for n in names if n.startswith("layers.")})
      raise ConfigError("targets", f"{t!r} matches no parameter of this model "
                        f"(per-layer parameters: {kinds})")
    for n in hits:
      shape = tuple(np.shape(params[n]))
      fan_in, fan_out = matrix_shape(shape)
      if lora.rank > min(fan_in, fan_out):
        raise ConfigError("rank", f"{lora.rank} exceeds {n}'s smaller side "
                          f"({fan_in}x{fan_out}); use rank <= "
                          f"{min(fan_in, fan_out)}")
      found[n] = shape
  return found


def _matches(name: str, target: str) -> bool:
  """'layers.3.attn.k_down' matches 'k_down' and 'attn.k_down';
  'layers.3.attn.q_proj.kernel' matches 'q_proj'."""
  if not name.startswith("layers."):
    return False
  stem = name.removesuffix(".kernel")
  return stem.endswith("." + target) or stem == target


def init_adapters(targets: Mapping[str, tuple[int, ...]], lora: LoraConfig,
                  seed: int = 0) -> Adapters:
  """A ~ U(±1/√in) (Kaiming-uniform, as in LoRA), B = 0: float32."""
  out = {}
  key = jax.random.PRNGKey(seed)
  for i, (name, shape) in enumerate(sorted(targets.items())):
    fan_in, fan_out = matrix_shape(shape)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, lora.rank),
                           jnp.float32, -bound, bound)
    out[name] = {"a": a, "b": jnp.zeros((lora.rank, fan_out), jnp.float32)}
  return out


def delta(adapter: Mapping[str, Array], shape: tuple[int, ...],
          scale: float) -> Array:
  """ΔW = scale·A·B in the parameter's shape, float32."""
  d = jnp.einsum("IR,RO->IO", adapter["a"], adapter["b"],
                 precision=jax.lax.Precision.HIGHEST)
  return (scale * d).reshape(shape)


def merge(params: Mapping[str, Any], adapters: Adapters, lora: LoraConfig
          ) -> dict[str, np.ndarray]:
  """Flat params with every adapter folded in (float32): W + ΔW."""
  out = dict(params)
  for name, ad in adapters.items():
    if name not in params:
      raise ConfigError("adapters", f"{name} is not a parameter of the model")
    w = np.asarray(params[name], np.float32)
    out[name] = w + np.asarray(delta(ad, w.shape, lora.scale))
  return out
