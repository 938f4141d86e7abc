"""`palu-jax finetune`: a model directory in, a fine-tuned one out.

The output holds the merged weights (no decode-time cost), the adapters on
their own (`adapters.safetensors`, with `lora.json`), the per-step losses
(`train_log.json`) and, when a plotter is given, `loss.png`. Training
checkpoints go to a separate directory (default OUT.ckpt) so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from palu_jax.errors import CheckpointError, PaluError
from palu_jax.lora.adapters import LoraConfig, merge
from palu_jax.lora.data import pack
from palu_jax.lora.train import LoraTrainer, TrainConfig


def finetune_checkpoint(src: str, out_dir: str, lora: LoraConfig,
                        train: TrainConfig, *, dataset: str = "wikitext2-calib",
                        data_dir: str | None = None,
                        checkpoint_dir: str | None = None,
                        overwrite: bool = False, progress: bool = True,
                        plot: Callable[[np.ndarray], bytes | None] | None = None,
                        mesh=None) -> tuple[str, dict]:
  """Fine-tunes LoRA adapters on `src` (dense or compressed) and writes the
  merged model to `out_dir`. Returns (absolute path, training log). With
  `mesh`, training is data-parallel on it (`LoraTrainer`)."""
  from safetensors.numpy import save as save_safetensors

  from palu_jax.api import load_params
  from palu_jax.checkpoint import load_tokenizer_for, save_model
  from palu_jax.data import load_text
  from palu_jax.errors import ConfigError
  from palu_jax.output_paths import check_output_dir
  train.validate()
  check_output_dir(out_dir, overwrite=overwrite, sources=(src,))
  cfg, params, palu, meta = load_params(src)
  if train.seqlen > cfg.max_seq_len:
    raise ConfigError("seqlen", f"{train.seqlen} is past the model's context "
                      f"of {cfg.max_seq_len} tokens")
  tok = load_tokenizer_for(src)
  if tok is None:
    raise PaluError(f"{src}: fine-tuning needs the model's tokenizer, and "
                    "none was found next to the checkpoint")
  ids = tok.encode(load_text(dataset, data_dir_override=data_dir),
                   add_bos=False)
  sequences = pack(ids, train.seqlen)
  trainer = LoraTrainer(cfg, params, palu, lora, train, mesh=mesh)
  start = time.perf_counter()
  adapters, losses = trainer.fit(
      sequences, checkpoint_dir=checkpoint_dir or out_dir.rstrip("/") + ".ckpt",
      progress=progress)
  log = {"steps": train.steps,
         "tokens": train.steps * train.batch_size * train.seqlen,
         "sequences_available": int(len(sequences)), "dataset": dataset,
         "seconds": round(time.perf_counter() - start, 1),
         "losses": [float(x) for x in losses],
         "lora": lora.to_dict(), "train": train.to_dict(),
         "targets": sorted(trainer.targets)}
  merged = merge(params, adapters, lora)
  flat = {f"{name}.{part}": np.asarray(v) for name, ad in adapters.items()
          for part, v in ad.items()}
  files = {"adapters.safetensors": save_safetensors(flat),
           "lora.json": json.dumps(lora.to_dict(), indent=1) + "\n",
           "train_log.json": json.dumps(log, indent=1) + "\n"}
  png = plot(losses) if plot is not None else None
  if png:
    files["loss.png"] = png
  provenance = {k: v for k, v in meta.items()
                if k not in ("format", "version", "dtypes")}
  provenance["lora"] = {"source": os.path.abspath(src) if os.path.exists(src)
                        else src, "steps": train.steps,
                        "tokens": log["tokens"], "final_loss": log["losses"][-1]}
  path = save_model(out_dir, cfg, merged, tokenizer=tok, meta=provenance,
                    overwrite=overwrite, extra_files=files, sources=(src,))
  return path, log


def load_adapters(path: str) -> tuple[dict, LoraConfig]:
  """(adapters, LoraConfig) saved beside a fine-tuned model, for applying
  them unmerged (`lora.adapters.merge` onto the source's params)."""
  from safetensors.numpy import load_file
  st = os.path.join(path, "adapters.safetensors")
  if not os.path.exists(st):
    raise CheckpointError(st, "no adapters here (not a fine-tuned model)")
  with open(os.path.join(path, "lora.json")) as f:
    d = json.load(f)
  lora = LoraConfig(rank=int(d["rank"]), alpha=float(d["alpha"]),
                    targets=None if d["targets"] is None else tuple(d["targets"]))
  adapters: dict = {}
  for key, v in load_file(st).items():
    name, part = key.rsplit(".", 1)
    adapters.setdefault(name, {})[part] = v
  return adapters, lora
