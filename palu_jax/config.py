"""Model configuration: a frozen dataclass built from the canonical dict."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from palu_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
  """Llama-3.x frequency-dependent RoPE scaling (`rope_type: llama3`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder."""
  vocab_size: int
  dim: int                 # D
  n_layers: int            # L
  n_heads: int             # N
  n_kv_heads: int          # K
  head_dim: int            # H
  hidden_dim: int          # F
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  qkv_bias: bool = False
  arch: str = "llama"
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                 "head_dim", "hidden_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError("n_kv_heads", f"{self.n_kv_heads} does not divide "
                        f"n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ConfigError("head_dim", f"RoPE needs an even head_dim, got "
                        f"{self.head_dim}")
    if self.rope_theta <= 0:
      raise ConfigError("rope_theta", f"must be positive, got {self.rope_theta}")

  @property
  def q_per_kv(self) -> int:
    """G: query heads sharing one KV head."""
    return self.n_heads // self.n_kv_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(sorted(unknown)[0], "unknown config field")
    if d.get("rope_scaling"):
      try:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
      except TypeError as e:
        raise ConfigError("rope_scaling", str(e)) from e
    d["eos_ids"] = tuple(d.get("eos_ids") or ())
    try:
      return cls(**d)
    except TypeError as e:
      raise ConfigError("config", str(e)) from e

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eos_ids"] = list(self.eos_ids)
    return d


def check_cache_bits(kv_bits: int, k_up_bits: int = 16) -> None:
  """Latent cache precision (16, or 8/4/3/2-bit codes) and B_k precision
  (16, or 8: e4m3); shared by PaluConfig and every method's config."""
  if kv_bits not in (2, 3, 4, 8, 16):
    raise ConfigError("kv_bits", f"must be 16, 8, 4, 3 or 2, got {kv_bits}")
  if k_up_bits not in (8, 16):
    raise ConfigError("k_up_bits", f"must be 16 or 8, got {k_up_bits}")


def cache_quant_group(quant_group: int | None, kv_bits: int) -> int:
  """Latents per scale of a quantized cache: the given quant_group, or by
  default one scale per token and latent group (0) for float8 codes and 32
  for integer codes. Raises ConfigError for a negative quant_group (the
  one check of every method's config)."""
  if quant_group is None:
    return 0 if kv_bits == 8 else 32
  if quant_group < 0:
    raise ConfigError("quant_group", f"must be >= 0 (0: one scale per "
                      f"token and latent group), got {quant_group}")
  return quant_group


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PaluConfig:
  """Shape of a Palu-compressed attention: per layer, per KV-head group, the
  latent rank of keys and of values.

  Groups are `group_size` consecutive KV heads (1: M-LRD, K: J-LRD). The cache
  of layer l stores Σ_g k_ranks[l][g] key latents and Σ_g v_ranks[l][g] value
  latents per token. How the ranks were found is provenance, kept in the
  checkpoint's marker, not here (this config is hashed as jit-static state).
  """
  group_size: int
  k_ranks: tuple[tuple[int, ...], ...]  # [L][K // group_size]
  v_ranks: tuple[tuple[int, ...], ...]
  # One latent per group serves keys and values (v_ranks == k_ranks); the
  # cache stores it once.
  shared_kv: bool = False
  # Latent cache precision: 16 (model dtype), 8 (float8 e4m3 codes) or
  # 4/3/2-bit per-token codes, in groups of `quant_group` latents with a
  # 16-bit scale (and offset) per group. quant_group 0: one scale per token
  # and latent group (`layer_quant_group`), the float8 format the Mosaic GPU
  # kernel reads.
  kv_bits: int = 16
  quant_group: int = 32
  scale_dtype: str = "bfloat16"
  # 8: B_k holds e4m3 codes times a power-of-two scale per latent group and
  # column (fp8_quant.round_weight_columns), what an fp8 kernel multiplies
  k_up_bits: int = 16

  def validate(self, cfg: ModelConfig) -> None:
    """Raises ConfigError unless the ranks fit `cfg`."""
    if self.group_size < 1 or cfg.n_kv_heads % self.group_size:
      raise ConfigError("group_size", f"{self.group_size} does not divide "
                        f"n_kv_heads={cfg.n_kv_heads}")
    check_cache_bits(self.kv_bits, self.k_up_bits)
    cache_quant_group(self.quant_group, self.kv_bits)
    if self.scale_dtype not in ("bfloat16", "float16"):
      raise ConfigError("scale_dtype", f"{self.scale_dtype!r} is not "
                        "bfloat16 or float16")
    groups, full = cfg.n_kv_heads // self.group_size, self.group_size * cfg.head_dim
    if self.shared_kv:
      if self.v_ranks != self.k_ranks:
        raise ConfigError("v_ranks", "a shared key/value latent needs "
                          "v_ranks == k_ranks")
      full = min(2 * full, cfg.dim)
    for name in ("k_ranks", "v_ranks"):
      ranks = getattr(self, name)
      if len(ranks) != cfg.n_layers:
        raise ConfigError(name, f"{len(ranks)} layers, the model has "
                          f"{cfg.n_layers}")
      for i, layer in enumerate(ranks):
        if len(layer) != groups:
          raise ConfigError(f"{name}[{i}]", f"{len(layer)} groups, expected "
                            f"{groups}")
        for r in layer:
          if not isinstance(r, int) or not 1 <= r <= full:
            raise ConfigError(f"{name}[{i}]", f"rank {r!r} is impossible for "
                              f"a group of width {full} (1..{full})")
        if self.kv_bits < 16 and self.quant_group and \
            sum(layer) % self.quant_group:
          raise ConfigError("quant_group", f"{self.quant_group} does not "
                            f"divide layer {i}'s {name[0]} latent width "
                            f"{sum(layer)}")

  def layer_quant_group(self, layer: int) -> int:
    """Latents per scale in `layer`'s cache: quant_group, or with
    quant_group 0 its latent groups' rank (one scale per token and group;
    the largest size dividing every key and value rank when they differ)."""
    if self.quant_group:
      return self.quant_group
    return math.gcd(*self.k_ranks[layer], *self.v_ranks[layer])

  def kv_latents_per_token(self) -> int:
    """Σ over layers of key + value latent widths (cache entries per token)."""
    k = sum(map(sum, self.k_ranks))
    return k if self.shared_kv else k + sum(map(sum, self.v_ranks))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PaluConfig":
    try:
      return cls(group_size=int(d["group_size"]),
                 k_ranks=tuple(tuple(int(r) for r in l) for l in d["k_ranks"]),
                 v_ranks=tuple(tuple(int(r) for r in l) for l in d["v_ranks"]),
                 shared_kv=bool(d.get("shared_kv", False)),
                 kv_bits=int(d.get("kv_bits", 16)),
                 quant_group=int(d.get("quant_group", 32)),
                 scale_dtype=str(d.get("scale_dtype", "bfloat16")),
                 k_up_bits=int(d.get("k_up_bits", 16)))
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError("compression", f"invalid Palu config: {e!r}") from e

  def to_dict(self) -> dict[str, Any]:
    return {"group_size": self.group_size,
            "k_ranks": [list(l) for l in self.k_ranks],
            "v_ranks": [list(l) for l in self.v_ranks],
            "shared_kv": self.shared_kv, "kv_bits": self.kv_bits,
            "quant_group": self.quant_group, "scale_dtype": self.scale_dtype,
            "k_up_bits": self.k_up_bits}
