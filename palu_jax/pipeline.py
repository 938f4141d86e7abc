"""Source checkpoint -> compressed model directory, for any method.

  out, report = compress_checkpoint("smollm2-135m", "smollm2-palu50",
                                    CompressionConfig(ratio=0.5))
  out, report = compress_checkpoint("smollm2-135m", "smollm2-eigen30",
                                    EigenConfig(ratio=0.3))

The method is picked by the config's type (`METHODS`); every check that
needs no calibration runs before the first model pass.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from palu_jax.calibrate.statistics import CalibrationConfig, calibrate
from palu_jax.compress import CompressionConfig, PaluMethod
from palu_jax.eigen.compress import EigenConfig, EigenMethod
from palu_jax.errors import ConfigError, PaluError
from palu_jax.method import CompressionJob, Method

METHODS: tuple[Method, ...] = (PaluMethod(), EigenMethod())


def method_for(comp) -> Method:
  """The method whose config type `comp` is (ConfigError otherwise)."""
  for method in METHODS:
    if isinstance(comp, method.config_type):
      return method
  names = " or ".join(m.config_type.__name__ for m in METHODS)
  raise ConfigError("comp", f"must be a {names}, got {type(comp).__name__}")


def fp8_k_up(cfg, params, palu):
  """Rounds every layer's B_k to e4m3 codes with a power-of-two scale per
  latent group and column; marks the layout (k_up_bits=8)."""
  from palu_jax.quantize.fp8_quant import round_weight_columns
  params = dict(params)
  for i, ranks in enumerate(palu.k_ranks):
    key = f"layers.{i}.attn.k_up"
    params[key] = round_weight_columns(params[key], ranks).astype(
        np.asarray(params[key]).dtype)
  return params, dataclasses.replace(palu, k_up_bits=8)


def compress_checkpoint(src: str, out_dir: str,
                        comp: CompressionConfig | EigenConfig,
                        calib: CalibrationConfig = CalibrationConfig(), *,
                        dtype: str = "float32", cache_dir: str | None = None,
                        data_dir: str | None = None, overwrite: bool = False,
                        progress: bool = True, mesh=None) -> tuple[str, dict]:
  """Source checkpoint or model directory -> compressed model directory.

  `comp` picks the method: a CompressionConfig (Palu) or an EigenConfig
  (Eigen Attention). Calibration runs the dense model in `dtype`. The
  directory holds the latent-cache params (orbax), its PaluConfig in the
  marker (kind 'palu'), how it was made, and `ranks.md`. Returns (absolute
  path, report). With `mesh`, calibration runs data-parallel on it
  (`palu_jax.calibrate.statistics.calibrate`).
  """
  from palu_jax.api import parse_dtype
  from palu_jax.checkpoint import load_source, load_tokenizer_for, save_model
  from palu_jax.model import from_params
  from palu_jax.output_paths import check_output_dir
  method = method_for(comp)
  if not isinstance(calib, CalibrationConfig):
    raise ConfigError("calib", "must be a CalibrationConfig, got "
                      f"{type(calib).__name__}")
  calib.validate()
  check_output_dir(out_dir, overwrite=overwrite, sources=(src,))
  cfg, base, meta = load_source(src)
  if meta.get("kind") == "palu":
    raise ConfigError("model", f"{src} is already Palu-compressed; compress "
                      "the dense model instead")
  comp = comp.resolved(cfg)               # defaults that follow the model
  comp.validate(cfg)
  if calib.seqlen > cfg.max_seq_len:
    raise ConfigError("calibration.seqlen", f"{calib.seqlen} is past the "
                      f"model's context of {cfg.max_seq_len} tokens")
  tok = load_tokenizer_for(src)
  stats = model = None
  if method.needs_statistics(comp):
    if tok is None:
      raise PaluError(f"{src}: calibration needs the model's tokenizer, and "
                      "none was found next to the checkpoint")
    model = from_params(cfg, base, dtype=parse_dtype(dtype), mesh=mesh)
    stats = calibrate(model, tok, calib, fisher=method.needs_fisher(comp),
                      cache_dir=cache_dir, progress=progress,
                      data_dir=data_dir, mesh=mesh)
  result = method.run(CompressionJob(
      cfg=cfg, base=base, stats=stats, model=model, tokenizer=tok, comp=comp,
      calib=calib, data_dir=data_dir, progress=progress, mesh=mesh))
  del model
  params, palu = result.params, result.palu
  if comp.k_up_bits == 8:
    params, palu = fp8_k_up(cfg, params, palu)
  report = result.report
  report["calibration_seconds"] = 0.0 if stats is None else stats.seconds
  provenance = {"kind": "palu", "palu": palu.to_dict(),
                "compression": result.settings,
                "calibration": dataclasses.asdict(calib),
                "source": meta.get("source", os.path.abspath(src)
                                   if os.path.exists(src) else src),
                "kv_bytes_per_token": report["kv_bytes_per_token"],
                "dense_kv_bytes_per_token": report["dense_kv_bytes_per_token"]}
  path = save_model(out_dir, cfg, params, tokenizer=tok,
                    meta=provenance, overwrite=overwrite,
                    extra_files={"ranks.md": result.table + "\n"},
                    sources=(src,))
  return path, report
