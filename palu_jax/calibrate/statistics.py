"""Calibration statistics for compression: Gram matrices of the k/v inputs
and Fisher scores of the k/v projections, from random windows of a corpus,
cached on disk under a key of the model's parameters and the settings (a
second compression with other settings does not recalibrate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time

import numpy as np
from flax import nnx

from palu_jax.checkpoint import atomic_write_bytes
from palu_jax.errors import ConfigError, PaluError
from palu_jax.fields import check_field_types, check_positive

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationConfig:
  """Which text calibrates, and how much of it."""
  dataset: str = "wikitext2-calib"  # or a corpus name / .txt / .jsonl path
  windows: int = 32                 # N random windows ...
  seqlen: int = 512                 # ... of T tokens
  fisher_windows: int | None = None  # Fisher on the first n (default: all)
  seed: int = 0
  batch_size: int = 1

  def __post_init__(self):
    check_field_types(self, "calibration.")

  def validate(self) -> None:
    check_positive(self, ("windows", "seqlen", "batch_size"), "calibration.")
    if self.fisher_windows is not None and not (
        1 <= self.fisher_windows <= self.windows):
      raise ConfigError("calibration.fisher_windows",
                        f"must be in 1..windows={self.windows}")


@dataclasses.dataclass
class CalibrationStats:
  """What compression needs from calibration (all on the host)."""
  grams: np.ndarray            # [L, D, D] float64 Σ xᵀx of the k/v inputs
  tokens: int                  # tokens summed into grams
  fisher: dict[str, float]     # 'layers.{i}.attn.{k,v}_proj' -> score ({} if
                               # not computed)
  seconds: float = 0.0         # wall time spent calibrating (0 if cached)

  def check_finite(self) -> None:
    """Raises PaluError naming the layers whose Gram matrix holds NaN/Inf."""
    bad = [i for i in range(len(self.grams))
           if not np.all(np.isfinite(self.grams[i]))]
    if bad:
      raise PaluError(f"calibration Gram matrix of layer {bad[0]} holds "
                      f"NaN/Inf values (bad layers: {bad}); check the "
                      "calibration data and dtype")


def model_fingerprint(model) -> str:
  """A hash of every parameter (and the dtype): the calibration cache key's
  model half."""
  h = hashlib.blake2b(digest_size=16)
  for path, v in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                        key=lambda kv: str(kv[0])):
    a = np.asarray(v[...])
    h.update(f"{path}:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _save_grams(path: str, grams: np.ndarray, tokens: int) -> None:
  buf = io.BytesIO()
  np.savez(buf, grams=grams, tokens=tokens)
  atomic_write_bytes(path, buf.getvalue())


def calibration_windows(tokenizer, calib: CalibrationConfig, *,
                        data_dir: str | None = None) -> np.ndarray:
  """The [calib.windows, calib.seqlen] token windows `calibrate` reads
  (seeded, so every consumer sees the same ones)."""
  from palu_jax.calibrate.windows import sample_windows
  from palu_jax.data import load_text
  ids = tokenizer.encode(load_text(calib.dataset, data_dir_override=data_dir),
                         add_bos=False)
  return sample_windows(ids, count=calib.windows, seqlen=calib.seqlen,
                        seed=calib.seed)


def calibrate(model, tokenizer, calib: CalibrationConfig, *,
              fisher: bool = True, cache_dir: str | None = None,
              progress: bool = True, data_dir: str | None = None,
              mesh=None) -> CalibrationStats:
  """XᵀX of the k/v inputs (and Fisher scores) on random calibration windows.

  With `mesh`, both run data-parallel (windows over "data", parameters
  sharded by their logical axes; `activations.kv_input_grams`).

  With `cache_dir`, results are stored there (and reused) under a key of
  the model's parameters and `calib`; Gram matrices and Fisher scores are
  cached separately, so a run that needs no Fisher scores skips them.
  """
  from palu_jax.calibrate.activations import kv_input_grams
  from palu_jax.calibrate.fisher import kv_fisher
  calib.validate()
  grams_path = fisher_path = None
  if cache_dir:
    key = hashlib.blake2b(
        (model_fingerprint(model) + json.dumps(dataclasses.asdict(calib),
                                               sort_keys=True)).encode(),
        digest_size=16).hexdigest()
    grams_path = os.path.join(cache_dir, f"calib-{key}-grams.npz")
    fisher_path = os.path.join(cache_dir, f"calib-{key}-fisher.json")
  start = time.perf_counter()
  windows = None

  def get_windows():
    return calibration_windows(tokenizer, calib, data_dir=data_dir)

  if grams_path and os.path.exists(grams_path):
    log.info("calibration Gram matrices from %s", grams_path)
    with np.load(grams_path) as z:
      grams, tokens = z["grams"], int(z["tokens"])
  else:
    windows = get_windows()
    grams, tokens = kv_input_grams(model, windows, batch_size=calib.batch_size,
                                   progress=progress, mesh=mesh)
    if grams_path:
      _save_grams(grams_path, grams, tokens)
  scores: dict[str, float] = {}
  if fisher:
    if fisher_path and os.path.exists(fisher_path):
      with open(fisher_path) as f:
        scores = json.load(f)
    else:
      windows = get_windows() if windows is None else windows
      scores = kv_fisher(model, windows[:calib.fisher_windows or calib.windows],
                         batch_size=calib.batch_size, progress=progress,
                         mesh=mesh)
      if fisher_path:
        atomic_write_bytes(fisher_path, json.dumps(scores).encode())
  return CalibrationStats(grams=grams, tokens=tokens, fisher=scores,
                          seconds=time.perf_counter() - start)
