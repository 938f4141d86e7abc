"""Eigen Attention compression: bases, rank search, folded parameters.

  stats = calibrate(model, tok, calib, fisher=False)     # XᵀX per layer
  x = attention_inputs(model, windows)                   # error windows
  params, palu, report = eigen_params(cfg, base, stats, model, x,
                                      EigenConfig(eps=0.025))

The result is a latent-cache model of the same kind as Palu's with one head
per group (M-LRD layout): head j's latent is its key (value) in the layer's
basis, k_down = W_k[j]·U_r, k_up = U_rᵀ (then RoPE), and the value basis is
folded into W_o. So the compressed model runs through the same cache,
quantization, kernels and generation loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from palu_jax.calibrate.statistics import CalibrationStats
from palu_jax.config import (ModelConfig, PaluConfig, cache_quant_group,
                             check_cache_bits)
from palu_jax.decompose.fold import palu_params
from palu_jax.decompose.ranks import target_total
from palu_jax.decompose.svd import LowRank
from palu_jax.eigen.basis import Basis, projection_basis
from palu_jax.eigen.layer_error import LayerError
from palu_jax.eigen.threshold import LayerSweep, budget_choice, sweep_layer
from palu_jax.errors import ConfigError, PaluError
from palu_jax.fields import check_field_types, check_positive
from palu_jax.kv_report import rank_report
from palu_jax.method import CompressionJob, Method, MethodResult
from palu_jax.quantize.hadamard import fold_rotation

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EigenConfig:
  """How to compress with Eigen Attention.

  eps: per-layer attention-output relative error budget (error mode).
  ratio: fraction of the KV cache removed, met exactly (budget mode; the
    error search then only orders layers). None: error mode.
  step: τ decrement of the energy-threshold search.
  floor: ranks never fall below this fraction of the head dim.
  multiple: ranks are multiples of this (None: 16, the kernels' unit, or
    half the head dim when that is smaller; see `resolved`).
  error_windows: calibration windows the layer errors are measured on.
  hadamard, kv_bits, quant_group: as for Palu (latent rotation and cache
    precision).
  """
  eps: float = 0.025
  ratio: float | None = None
  step: float = 0.02
  floor: float = 0.45
  multiple: int | None = None
  error_windows: int = 8
  hadamard: bool = False
  kv_bits: int = 16
  quant_group: int | None = None     # None: as CompressionConfig's
  k_up_bits: int = 16

  def __post_init__(self):
    check_field_types(self)
    check_positive(self, ("multiple", "error_windows"))
    cache_quant_group(self.quant_group, self.kv_bits)

  def resolved(self, cfg: ModelConfig) -> "EigenConfig":
    """This config with the defaults that depend on the model filled in."""
    if self.multiple is not None:
      return self
    # 16 is the kernels' unit; a tiny head (stories260K: 8) takes half of
    # it, so that ratios down to 50 % stay reachable
    return dataclasses.replace(self, multiple=min(16, cfg.head_dim // 2))

  def validate(self, cfg: ModelConfig) -> None:
    if self.multiple is None:
      return self.resolved(cfg).validate(cfg)
    if not self.eps > 0:
      raise ConfigError("eps", f"must be positive, got {self.eps}")
    if self.ratio is not None and not 0 < self.ratio < 1:
      raise ConfigError("ratio", f"KV reduction must be in (0, 1), got "
                        f"{self.ratio}")
    if not 0 < self.step < 1:
      raise ConfigError("step", f"must be in (0, 1), got {self.step}")
    if not 0 < self.floor <= 1:
      raise ConfigError("floor", f"must be in (0, 1], got {self.floor}")
    if not 1 <= self.multiple <= cfg.head_dim:
      raise ConfigError("multiple", f"must be in 1..head_dim={cfg.head_dim}, "
                        f"got {self.multiple}")
    if cfg.head_dim % self.multiple:
      raise ConfigError("multiple", f"{self.multiple} does not divide "
                        f"head_dim={cfg.head_dim}")
    check_cache_bits(self.kv_bits, self.k_up_bits)
    group = cache_quant_group(self.quant_group, self.kv_bits)
    if self.kv_bits < 16 and group and \
        (cfg.n_kv_heads * self.multiple) % group:
      raise ConfigError("quant_group", f"a layer's latent width is "
                        f"{cfg.n_kv_heads}·rank with ranks in steps of "
                        f"{self.multiple}; {group} must divide "
                        f"{cfg.n_kv_heads * self.multiple} (raise --rank-"
                        "multiple or lower --quant-group)")

  def to_dict(self) -> dict[str, Any]:
    return {"method": "eigen", **dataclasses.asdict(self)}


def layer_bases(cfg: ModelConfig, base: Mapping[str, np.ndarray],
                stats: CalibrationStats) -> list[tuple[Basis, Basis]]:
  """(key basis, value basis) of every layer, from the calibration Grams."""
  stats.check_finite()
  out = []
  for i in range(cfg.n_layers):
    gram = np.asarray(stats.grams[i], np.float64) / max(stats.tokens, 1)
    pre = f"layers.{i}.attn."
    out.append(tuple(projection_basis(base[pre + f"{kind}_proj.kernel"],
                                      gram, cfg.head_dim)
                     for kind in ("k", "v")))
  return out


def search_ranks(cfg: ModelConfig, bases, errors, econf: EigenConfig, *,
                 progress: bool = False
                 ) -> tuple[list[tuple[int, int]], list[LayerSweep], float]:
  """Per-layer (key rank, value rank), the sweeps behind them, and the ε
  they answer (econf.eps, or the one budget mode settled on).

  errors: per layer, a callable (pk [H, H], pv [H, H]) -> relative error.
  """
  budget = econf.ratio is not None
  sweeps = []
  for i in tqdm(range(cfg.n_layers), desc="eigen rank search", unit="layer",
                disable=not progress):
    kb, vb = bases[i]
    sweeps.append(sweep_layer(
        kb.energy, vb.energy,
        lambda rk, rv, kb=kb, vb=vb, f=errors[i]: f(kb.projector(rk),
                                                    vb.projector(rv)),
        step=econf.step, floor=econf.floor, multiple=econf.multiple,
        eps=None if budget else econf.eps))
  if not budget:
    return [s.ranks[s.choose(econf.eps)] for s in sweeps], sweeps, econf.eps
  per_side = [cfg.head_dim] * (2 * cfg.n_layers)
  unit = econf.multiple
  total = cfg.n_kv_heads * target_total(per_side, 1.0 - econf.ratio, unit)
  eps, chosen = budget_choice(sweeps, [b[0].energy for b in bases],
                              [b[1].energy for b in bases], total,
                              kv_heads=cfg.n_kv_heads, multiple=unit)
  return chosen, sweeps, eps


def eigen_parts(cfg: ModelConfig, base: Mapping[str, np.ndarray], bases,
                chosen, *, hadamard: bool = False):
  """[L][K] LowRank factors of keys and of values: head j's down is
  W[j]·U_r [D, r], its up U_rᵀ [r, H]."""
  h = cfg.head_dim
  parts = {"k": [], "v": []}
  for i, ranks in enumerate(chosen):
    for side, (kind, basis, r) in enumerate(zip(("k", "v"), bases[i], ranks)):
      w = np.asarray(base[f"layers.{i}.attn.{kind}_proj.kernel"], np.float64)
      u = basis.vectors[:, :r]
      layer = []
      for j in range(cfg.n_kv_heads):
        down, up = w[:, j * h:(j + 1) * h] @ u, u.T
        if hadamard:
          down, up = fold_rotation(down, up)
        layer.append(LowRank(down, up, np.sqrt(basis.energy)))
      parts[kind].append(layer)
  return parts


def eigen_params(cfg: ModelConfig, base: Mapping[str, np.ndarray],
                 stats: CalibrationStats, model, inputs: np.ndarray,
                 econf: EigenConfig, *, progress: bool = False
                 ) -> tuple[dict[str, np.ndarray], PaluConfig, dict]:
  """Dense params -> (Eigen-compressed params, PaluConfig, report).

  Args:
    model: the dense model (its attention modules measure the errors).
    inputs: [L, N, T, D] attention inputs of the error windows
      (`layer_error.attention_inputs`).
  """
  econf.validate(cfg)
  if inputs.shape[0] != cfg.n_layers or inputs.shape[-1] != cfg.dim:
    raise PaluError(f"attention inputs of shape {inputs.shape} do not fit "
                    f"{cfg.n_layers} layers of width {cfg.dim}")
  start = time.perf_counter()
  bases = layer_bases(cfg, base, stats)
  errors = [LayerError(model.layers[i].attn, inputs[i])
            for i in range(cfg.n_layers)]
  chosen, sweeps, eps = search_ranks(cfg, bases, errors, econf,
                                     progress=progress)
  parts = eigen_parts(cfg, base, bases, chosen, hadamard=econf.hadamard)
  params, palu = palu_params(base, cfg, 1, parts["k"], parts["v"])
  palu = dataclasses.replace(palu, kv_bits=econf.kv_bits,
                             quant_group=cache_quant_group(
                                 econf.quant_group, econf.kv_bits))
  palu.validate(cfg)
  report = rank_report(cfg, palu, stats)
  report["eigen"] = {"eps": eps, "layers": [
      _layer_row(s, r, errors[i], bases[i]) for i, (s, r) in
      enumerate(zip(sweeps, chosen))]}
  report["compress_seconds"] = time.perf_counter() - start
  return params, palu, report


def _layer_row(sweep: LayerSweep, ranks, error, bases) -> dict:
  """τ, ranks and calibration error of one layer's choice."""
  at = [i for i, p in enumerate(sweep.ranks) if p == tuple(ranks)]
  tau = sweep.taus[at[-1]] if at else None   # budget fill may leave the sweep
  err = (sweep.errors[at[-1]] if at else
         error(bases[0].projector(ranks[0]), bases[1].projector(ranks[1])))
  return {"tau": tau, "k_rank": int(ranks[0]), "v_rank": int(ranks[1]),
          "error": float(err),
          "k_energy_kept": _kept(bases[0].energy, ranks[0]),
          "v_energy_kept": _kept(bases[1].energy, ranks[1])}


def _kept(energy, r) -> float:
  return float(np.sum(energy[:r]) / max(float(np.sum(energy)), 1e-30))


def format_eigen_report(report: dict) -> str:
  """A markdown table of the per-layer choice."""
  lines = [f"Eigen Attention, ε = {report['eigen']['eps']:.4g}", "",
           "| layer | τ | k rank | v rank | k energy | v energy | "
           "output error |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for i, r in enumerate(report["eigen"]["layers"]):
    tau = "fill" if r["tau"] is None else f"{r['tau']:.2f}"
    lines.append(f"| {i} | {tau} | {r['k_rank']} | {r['v_rank']} | "
                 f"{r['k_energy_kept']:.4f} | {r['v_energy_kept']:.4f} | "
                 f"{r['error']:.4f} |")
  lines.append(f"\nKV cache: {report['kv_bytes_per_token']} B/token "
               f"(dense {report['dense_kv_bytes_per_token']} B/token, kept "
               f"{report['kept_fraction']:.1%})")
  return "\n".join(lines)


class EigenMethod(Method):
  """Eigen Attention: calibrated per-layer bases, ranks by an error budget
  (`EigenConfig`). Runs the dense model on calibration windows to measure
  each layer's attention-output error."""
  name = "eigen"
  config_type = EigenConfig

  def needs_statistics(self, comp: EigenConfig) -> bool:
    return True

  def needs_fisher(self, comp: EigenConfig) -> bool:
    return False

  def run(self, job: CompressionJob) -> MethodResult:
    from palu_jax.calibrate.statistics import calibration_windows
    from palu_jax.eigen.layer_error import attention_inputs
    comp = job.comp
    windows = calibration_windows(job.tokenizer, job.calib,
                                  data_dir=job.data_dir)
    if comp.error_windows > len(windows):
      log.warning("eigen: measuring errors on all %d calibration windows "
                  "(error_windows=%d)", len(windows), comp.error_windows)
    inputs = attention_inputs(job.model, windows[:comp.error_windows],
                              batch_size=job.calib.batch_size,
                              progress=job.progress)
    params, palu, report = eigen_params(job.cfg, job.base, job.stats,
                                        job.model, inputs, comp,
                                        progress=job.progress)
    return MethodResult(params, palu, report, format_eigen_report(report),
                        comp.to_dict())


__all__ = ["EigenConfig", "EigenMethod", "eigen_params", "eigen_parts", "format_eigen_report",
           "layer_bases", "search_ranks"]
