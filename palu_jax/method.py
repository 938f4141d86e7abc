"""The interface every KV-cache compression method implements.

`palu_jax.pipeline.compress_checkpoint` loads the model, checks the output,
runs calibration when the method asks for it, calls `Method.run` and writes
the checkpoint; it knows no method by name. Palu (`compress.PaluMethod`)
and Eigen Attention (`eigen.compress.EigenMethod`) are peers behind it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np

from palu_jax.calibrate.statistics import CalibrationConfig, CalibrationStats
from palu_jax.config import ModelConfig, PaluConfig


@dataclasses.dataclass(frozen=True)
class CompressionJob:
  """What a method gets: the dense model's config and weights, calibration
  statistics (None if it asked for none), the dense NNX model and the
  tokenizer (for methods that run it), and its own config."""
  cfg: ModelConfig
  base: Mapping[str, np.ndarray]
  stats: CalibrationStats | None
  model: Any
  tokenizer: Any
  comp: Any
  calib: CalibrationConfig
  data_dir: str | None
  progress: bool
  mesh: Any = None        # the jax.sharding.Mesh the job runs on, if any


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """What a method returns: the compressed parameters, the latent layout
  (PaluConfig), a report dict (kv_bytes_per_token, dense_kv_bytes_per_token,
  kept_fraction, compress_seconds, ...), its markdown table (ranks.md) and
  the settings recorded in the checkpoint's marker."""
  params: Mapping[str, np.ndarray]
  palu: PaluConfig
  report: dict
  table: str
  settings: dict


class Method:
  """A compression method. Subclasses set `name` and `config_type` and
  implement the three methods below."""
  name: ClassVar[str]
  config_type: ClassVar[type]

  def needs_statistics(self, comp) -> bool:
    """Whether `run` needs calibration statistics (Gram matrices)."""
    raise NotImplementedError

  def needs_fisher(self, comp) -> bool:
    """Whether those statistics must include Fisher scores."""
    raise NotImplementedError

  def run(self, job: CompressionJob) -> MethodResult:
    raise NotImplementedError
