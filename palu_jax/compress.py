"""Palu compression: calibrate, decompose per head group, allocate ranks,
fold, and describe the result.

  stats = calibrate(model, tokenizer, CalibrationConfig(...), cache_dir=...)
  params, palu, report = compress_params(cfg, base_params, stats,
                                         CompressionConfig(ratio=0.5))

Calibration (`palu_jax.calibrate.statistics`, re-exported here) is cached on
disk, so later runs with other compression settings reuse it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from palu_jax.calibrate.statistics import (  # noqa: F401  (re-exported)
    CalibrationConfig, CalibrationStats, calibrate)
from palu_jax.config import (ModelConfig, PaluConfig, cache_quant_group,
                             check_cache_bits)
from palu_jax.decompose import lrd, metrics, ranks
from palu_jax.decompose.fold import palu_params
from palu_jax.decompose.svd import Factorization, LowRank, factorize_many
from palu_jax.errors import ConfigError, PaluError
from palu_jax.fields import check_field_types, check_positive
from palu_jax.kv_report import (format_rank_report, kv_bytes_per_token,
                                rank_report)
from palu_jax.method import CompressionJob, Method, MethodResult
from palu_jax.quantize.hadamard import fold_rotation


log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "fisher", "error", "fisher-error")
WHITENING = ("none", "input", "attention")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompressionConfig:
  """How to compress. The defaults are the best configuration measured on
  SmolLM2-135M (eval/results/palu_smollm2.md): one shared, attention-aware
  latent per head group; `CompressionConfig.palu()` is Palu as published.

  ratio: fraction of the KV cache removed (0.5 keeps half the latents).
  mode: 'mlrd' | 'glrd' | 'jlrd' (head groups of 1, group_size, all).
  alloc: 'uniform' (same kept fraction everywhere), 'fisher' (Palu: rank ∝
    Fisher score), 'error' (least total truncation error, measured on the
    whitened spectra; needs whiten != 'none' for meaningful units).
  whiten: 'none' (plain SVD), 'input' (Palu: ‖X·ΔW‖), 'attention' (also
    weighted by what the error costs: query metric for keys, W_o for values).
  multiple: ranks are multiples of this (kernel tiles).
  k_fraction: share of the latent budget given to keys; None pools keys and
    values together (Palu).
  shared_kv: one latent per head group for keys and values (decomposes
    [W_k W_v] jointly, each side's error normalised to its own energy and
    keys' weighted by `k_weight`); the cache stores it once.
  rope_span: the attention-aware key metric averages RoPE over causal
    distances 0..rope_span-1 (None: the calibration window length).
  hadamard: fold a (block) Walsh-Hadamard rotation into every group's down
    and up projections: the model is unchanged, its latents lose outliers.
  kv_bits, quant_group: latent cache precision (16, float8 codes (8) or
    4/3/2-bit codes, in groups of quant_group latents per token; 0: one
    scale per token and latent group, what the Mosaic GPU kernel reads;
    None: 0 for float8, 32 for integer codes — `cache_quant_group`).
  """
  ratio: float = 0.5
  mode: str = "jlrd"
  group_size: int = 4
  alloc: str = "uniform"
  whiten: str = "attention"
  multiple: int = 16
  k_fraction: float | None = None
  shared_kv: bool = True
  k_weight: float = 2.0
  rope_span: int | None = 512
  hadamard: bool = False
  kv_bits: int = 16
  quant_group: int | None = None
  k_up_bits: int = 16

  def __post_init__(self):
    check_field_types(self)
    check_positive(self, ("group_size", "multiple", "rope_span"))
    self.cache_quant_group()

  def cache_quant_group(self) -> int:
    """quant_group, or its default for kv_bits: one scale per token and
    latent group for float8 (SmolLM2 at 50 %, 24 WikiText-2 windows, CPU:
    23.5822 vs 23.5827 with groups of 32, in 5 % fewer bytes), 32 latents
    for integer codes."""
    return cache_quant_group(self.quant_group, self.kv_bits)

  def resolved(self, cfg: ModelConfig) -> "CompressionConfig":
    """No Palu default depends on the model (see `EigenConfig.resolved`)."""
    del cfg
    return self

  @classmethod
  def palu(cls, **overrides) -> "CompressionConfig":
    """Palu as published: separate key/value latents, input-whitened SVD,
    Fisher ranks over one pool."""
    return cls(**{**dict(alloc="fisher", whiten="input", shared_kv=False,
                         k_weight=1.0, rope_span=None), **overrides})

  def validate(self, cfg: ModelConfig) -> int:
    """Checks every field against `cfg`; returns the head-group size."""
    if not 0 < self.ratio < 1:
      raise ConfigError("ratio", f"KV reduction must be in (0, 1), got "
                        f"{self.ratio}")
    if self.alloc not in ALLOCATIONS:
      raise ConfigError("alloc", f"{self.alloc!r} not in {ALLOCATIONS}")
    if self.whiten not in WHITENING:
      raise ConfigError("whiten", f"{self.whiten!r} not in {WHITENING}")
    if self.k_fraction is not None and not 0 < self.k_fraction < 1:
      raise ConfigError("k_fraction", f"must be in (0, 1), got "
                        f"{self.k_fraction}")
    if self.shared_kv and self.k_fraction is not None:
      raise ConfigError("k_fraction", "a shared key/value latent has one "
                        "budget; use k_weight to balance keys and values")
    check_cache_bits(self.kv_bits, self.k_up_bits)
    if not self.k_weight > 0:
      raise ConfigError("k_weight", f"must be positive, got {self.k_weight}")
    try:
      mode = lrd.Mode(self.mode)
    except ValueError:
      raise ConfigError("mode", f"{self.mode!r} is not one of "
                        f"{[m.value for m in lrd.Mode]}") from None
    size = lrd.resolve_group_size(mode, cfg.n_kv_heads, self.group_size)
    group = self.cache_quant_group()
    if self.kv_bits < 16 and group and \
        self.multiple % group and group % self.multiple:
      raise ConfigError("quant_group", f"{group} and the rank "
                        f"multiple {self.multiple} must divide one another "
                        "(every latent width is a multiple of the latter)")
    if (size * cfg.head_dim) % self.multiple:
      raise ConfigError("multiple", f"{self.multiple} does not divide the "
                        f"group width {size * cfg.head_dim}")
    return size

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def factorize_model(cfg: ModelConfig, base: Mapping[str, np.ndarray],
                    stats: CalibrationStats | None, group_size: int,
                    whiten: str, seqlen: int = 2048, *,
                    shared_kv: bool = False, k_weight: float = 1.0,
                    progress: bool = False, devices=None
                    ) -> dict[str, list[list[Factorization]]]:
  """Full SVDs of every head group: {'k': [L][groups], 'v': [L][groups]},
  or {'kv': [L][groups]} of the joint [W_k W_v] with `shared_kv`. A layer's
  SVDs run concurrently over `devices` (`svd.factorize_many`; default all
  of this process's devices)."""
  if whiten != "none" and stats is None:
    raise PaluError(f"whiten={whiten!r} needs calibration statistics")
  if stats is not None:
    stats.check_finite()
  cols = lrd.group_columns(cfg.n_kv_heads, cfg.head_dim, group_size)
  out: dict[str, list[list[Factorization]]] = (
      {"kv": []} if shared_kv else {"k": [], "v": []})
  for i in tqdm(range(cfg.n_layers), desc="decomposition", unit="layer",
                disable=not progress):
    pre = f"layers.{i}.attn."
    gram = None if whiten == "none" else stats.grams[i] / stats.tokens
    w = {kind: np.asarray(base[pre + f"{kind}_proj.kernel"], np.float32)
         for kind in ("k", "v")}
    jobs = []                        # (kind, matrix, output metric factor)
    for g, c in enumerate(cols):
      factor = {}
      for kind in ("k", "v"):
        if whiten == "attention":
          heads = range(g * group_size, (g + 1) * group_size)
          ms = ([metrics.key_metric(base[pre + "q_proj.kernel"], gram, cfg, j,
                                    seqlen) for j in heads] if kind == "k" else
                [metrics.value_metric(base[pre + "o_proj.kernel"], cfg, j)
                 for j in heads])
          factor[kind] = metrics.group_factor(ms)
        elif shared_kv:
          factor[kind] = np.eye(c.stop - c.start)
        else:
          factor[kind] = None
      if not shared_kv:
        jobs += [(kind, w[kind][:, c], factor[kind]) for kind in ("k", "v")]
        continue
      # Joint: each side scaled to unit energy (its own units), keys by
      # k_weight, so neither dominates the shared latent by scale alone.
      g_in = np.eye(cfg.dim) if gram is None else gram
      for kind in ("k", "v"):
        wm = w[kind][:, c].astype(np.float64) @ factor[kind]
        energy = float(np.trace(wm.T @ g_in @ wm))
        scale = (k_weight if kind == "k" else 1.0) ** 0.5 / max(energy, 1e-30) ** 0.5
        factor[kind] = factor[kind] * scale
      joint = np.concatenate([w["k"][:, c], w["v"][:, c]], axis=1)
      jobs.append(("kv", joint, metrics.block_diag([factor["k"],
                                                    factor["v"]])))
    done = factorize_many([j[1] for j in jobs], gram,
                          out_factors=[j[2] for j in jobs], devices=devices)
    for kind in out:
      out[kind].append([f for (k, _, _), f in zip(jobs, done) if k == kind])
  return out


def allocate_ranks(cfg: ModelConfig, factors, stats: CalibrationStats | None,
                   comp: CompressionConfig, group_size: int
                   ) -> dict[str, list[list[int]]]:
  """Per-group ranks {'k': [L][groups], 'v': ...} meeting the budget exactly."""
  groups = cfg.n_kv_heads // group_size
  width = group_size * cfg.head_dim
  keep = 1.0 - comp.ratio
  if comp.shared_kv:
    return _allocate_shared(cfg, factors, stats, comp, groups, width)
  modules = [(kind, i, g) for kind in ("k", "v") for i in range(cfg.n_layers)
             for g in range(groups)]
  if comp.k_fraction is None:
    pools, shares = [modules], [1.0]
  else:
    pools = [[m for m in modules if m[0] == kind] for kind in ("k", "v")]
    shares = [comp.k_fraction, 1 - comp.k_fraction]
  budget = keep * len(modules) * width
  totals = []
  for pool, share in zip(pools, shares):
    cap = len(pool) * width
    if share * budget > cap:
      raise ConfigError("k_fraction", f"{share:.3f} of the budget exceeds "
                        f"the full size {cap} of one kind")
    totals.append(ranks.target_total([width] * len(pool), share * budget / cap,
                                     comp.multiple))
  chosen: dict[tuple, int] = {}
  for pool, total in zip(pools, totals):
    dims = [width] * len(pool)
    if comp.alloc == "uniform":
      got = ranks.uniform(dims, total, multiple=comp.multiple)
    elif comp.alloc == "fisher":
      got = ranks.allocate([_fisher(stats, f"layers.{i}.attn.{kind}_proj")
                            for kind, i, _ in pool], dims, total,
                           multiple=comp.multiple)
    else:
      spectra = [np.asarray(factors[kind][i][g].singular) for kind, i, g in pool]
      weights = _relative_error_weights(spectra)
      if comp.alloc == "fisher-error":  # ... scaled by the module's Fisher
        weights = [w * _fisher(stats, f"layers.{i}.attn.{kind}_proj")
                   for w, (kind, i, _) in zip(weights, pool)]
      got = ranks.allocate_by_error(spectra, dims, total,
                                    multiple=comp.multiple, weights=weights)
    chosen.update(zip(pool, got))
  return {kind: [[chosen[(kind, i, g)] for g in range(groups)]
                 for i in range(cfg.n_layers)] for kind in ("k", "v")}


def _allocate_shared(cfg, factors, stats, comp, groups, width):
  """One rank per (layer, group) latent; the budget counts it once against
  the dense cache's 2·width entries."""
  full = min(2 * width, cfg.dim)
  modules = [(i, g) for i in range(cfg.n_layers) for g in range(groups)]
  budget = (1.0 - comp.ratio) * 2 * width * len(modules)
  if budget > full * len(modules):
    raise ConfigError("ratio", f"keeping {1 - comp.ratio:.0%} of the cache "
                      f"needs latents wider than the model ({cfg.dim})")
  dims = [full] * len(modules)
  total = ranks.target_total(dims, budget / (full * len(modules)),
                             comp.multiple)
  if comp.alloc == "uniform":
    got = ranks.uniform(dims, total, multiple=comp.multiple)
  elif comp.alloc == "fisher":
    got = ranks.allocate([_fisher(stats, f"layers.{i}.attn.k_proj") +
                          _fisher(stats, f"layers.{i}.attn.v_proj")
                          for i, _ in modules], dims, total,
                         multiple=comp.multiple)
  else:
    spectra = [np.asarray(factors["kv"][i][g].singular) for i, g in modules]
    weights = _relative_error_weights(spectra)
    if comp.alloc == "fisher-error":
      weights = [w * (_fisher(stats, f"layers.{i}.attn.k_proj") +
                      _fisher(stats, f"layers.{i}.attn.v_proj"))
                 for w, (i, _) in zip(weights, modules)]
    got = ranks.allocate_by_error(spectra, dims, total,
                                  multiple=comp.multiple, weights=weights)
  chosen = dict(zip(modules, got))
  per_layer = [[chosen[(i, g)] for g in range(groups)]
               for i in range(cfg.n_layers)]
  return {"k": per_layer, "v": per_layer}


def _relative_error_weights(spectra) -> list[float]:
  """1 / total energy of each module: key and value errors (and layers) live
  in different units; relative errors are comparable."""
  return [1.0 / max(float(np.sum(np.square(s, dtype=np.float64))), 1e-30)
          for s in spectra]


def _fisher(stats: CalibrationStats | None, module: str) -> float:
  if stats is None or module not in stats.fisher:
    raise PaluError(f"this allocation needs the Fisher score of {module}; "
                    "calibrate with fisher=True")
  return stats.fisher[module]


def compress_params(cfg: ModelConfig, base: Mapping[str, np.ndarray],
                    stats: CalibrationStats | None, comp: CompressionConfig,
                    *, factors=None, seqlen: int = 2048,
                    progress: bool = False, devices=None
                    ) -> tuple[dict[str, np.ndarray], PaluConfig, dict]:
  """Dense params -> (Palu params, PaluConfig, report).

  `factors` (from factorize_model with the same group size and whitening)
  may be passed to reuse SVDs across ratios and allocations.
  """
  size = comp.validate(cfg)
  start = time.perf_counter()
  if factors is None:
    factors = factorize_model(cfg, base, stats, size, comp.whiten,
                              comp.rope_span or seqlen,
                              shared_kv=comp.shared_kv, k_weight=comp.k_weight,
                              progress=progress, devices=devices)
  chosen = allocate_ranks(cfg, factors, stats, comp, size)
  if comp.shared_kv:
    width = size * cfg.head_dim
    joint = [[f.truncate(r) for f, r in zip(factors["kv"][i], chosen["k"][i])]
             for i in range(cfg.n_layers)]
    parts = {"k": [[LowRank(p.down, p.up[:, :width], p.singular) for p in l]
                   for l in joint],
             "v": [[LowRank(p.down, p.up[:, width:], p.singular) for p in l]
                   for l in joint]}
  else:
    parts = {kind: [[f.truncate(r) for f, r in zip(factors[kind][i],
                                                   chosen[kind][i])]
                     for i in range(cfg.n_layers)] for kind in ("k", "v")}
  if comp.hadamard:
    parts = {kind: [[LowRank(*fold_rotation(np.asarray(p.down),
                                            np.asarray(p.up)), p.singular)
                     for p in layer] for layer in parts[kind]]
             for kind in ("k", "v")}
  params, palu = palu_params(base, cfg, size, parts["k"], parts["v"],
                             shared_kv=comp.shared_kv)
  palu = dataclasses.replace(palu, kv_bits=comp.kv_bits,
                             quant_group=comp.cache_quant_group())
  palu.validate(cfg)
  report = rank_report(cfg, palu, stats)
  report["compress_seconds"] = time.perf_counter() - start
  return params, palu, report


class PaluMethod(Method):
  """Palu: low-rank k/v projections (`CompressionConfig`)."""
  name = "palu"
  config_type = CompressionConfig

  def needs_statistics(self, comp: CompressionConfig) -> bool:
    return comp.whiten != "none" or comp.alloc != "uniform"

  def needs_fisher(self, comp: CompressionConfig) -> bool:
    return "fisher" in comp.alloc

  def run(self, job: CompressionJob) -> MethodResult:
    devices = None if job.mesh is None else job.mesh.local_devices
    params, palu, report = compress_params(job.cfg, job.base, job.stats,
                                           job.comp, seqlen=job.calib.seqlen,
                                           progress=job.progress,
                                           devices=devices)
    return MethodResult(params, palu, report, format_rank_report(report),
                        {"method": "palu", **job.comp.to_dict()})


def compress_checkpoint(*args, **kwargs):
  """`palu_jax.pipeline.compress_checkpoint` (this name is kept for code
  written before the method interface)."""
  from palu_jax.pipeline import compress_checkpoint as run
  return run(*args, **kwargs)
