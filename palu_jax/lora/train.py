"""LoRA training loop: frozen (compressed) model, AdamW with warmup and
cosine decay, gradient accumulation, jitted steps, orbax checkpoints that
resume bit-exactly.

  trainer = LoraTrainer(cfg, params, palu, LoraConfig(), TrainConfig())
  adapters, losses = trainer.fit(sequences, checkpoint_dir="run.ckpt")
  merged = merge(params, adapters, trainer.lora)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.errors import ConfigError, PaluError
from palu_jax.lora.adapters import (Adapters, LoraConfig, delta, find_targets,
                                    init_adapters)
from palu_jax.lora.data import batch_at
from palu_jax.losses import next_token_nll
from palu_jax.typing import Array

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
  """steps optimizer steps of batch_size sequences of seqlen tokens, each
  step summed over grad_accum micro-batches; lr peaks after warmup steps and
  decays to 0 by a cosine. compute_dtype is the forward/backward dtype (the
  adapters and their optimizer state stay float32)."""
  steps: int = 500
  lr: float = 2e-4
  warmup: int = 50
  batch_size: int = 8
  grad_accum: int = 1
  seqlen: int = 512
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  compute_dtype: str = "bfloat16"
  seed: int = 0
  checkpoint_every: int = 100
  keep: int = 3

  def validate(self) -> None:
    for name in ("steps", "batch_size", "grad_accum", "seqlen",
                 "checkpoint_every", "keep"):
      if getattr(self, name) < 1:
        raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
    if self.seqlen < 2:
      raise ConfigError("seqlen", "needs >= 2 tokens (one prediction)")
    if self.batch_size % self.grad_accum:
      raise ConfigError("grad_accum", f"{self.grad_accum} does not divide "
                        f"batch_size={self.batch_size}")
    if not 0 <= self.warmup < self.steps:
      raise ConfigError("warmup", f"must be in 0..steps-1, got {self.warmup}")
    if not self.lr > 0:
      raise ConfigError("lr", f"must be positive, got {self.lr}")
    if self.compute_dtype not in ("bfloat16", "float32", "float16"):
      raise ConfigError("compute_dtype", f"{self.compute_dtype!r} is not "
                        "bfloat16, float16 or float32")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _flat_name(path) -> str:
  """Tree path of an nnx.State leaf -> flat param name 'layers.3.attn.k_down'."""
  keys = [getattr(k, "key", None) for k in path]
  return ".".join(str(k) for k in keys if k is not None)


def with_adapters(graphdef, state, base: Mapping[str, Array],
                  adapters: Adapters, scale: float, dtype):
  """The model with each target W replaced by (W + ΔW) in `dtype`, W and ΔW
  added in float32 (the masters) so small updates are not lost to bf16.
  The state is rebuilt functionally (no mutation across traces)."""
  def swap(path, leaf):
    name = _flat_name(path)
    if name not in adapters:
      return leaf
    w = base[name]
    return (w + delta(adapters[name], w.shape, scale)).astype(dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(swap, state))


class LoraTrainer:
  """Trains LoRA adapters on a frozen model given by flat params."""

  def __init__(self, cfg: ModelConfig, params: Mapping[str, Any],
               palu: PaluConfig | None, lora: LoraConfig,
               train: TrainConfig, *, mesh=None):
    """mesh: a ("data", "model") mesh: the frozen model (and the float32
    target weights) sharded by their logical axes, each micro-batch split
    over "data"; the adapters (small) are replicated, their gradients
    reduced across devices by XLA."""
    from palu_jax.api import parse_dtype
    from palu_jax.model import from_params
    train.validate()
    self.cfg, self.lora, self.train = cfg, lora, train
    self.targets = find_targets(params, lora)
    self.dtype = parse_dtype(train.compute_dtype)
    # with a mesh, each weight goes from the host straight into its shards
    model = from_params(cfg, params, dtype=self.dtype, palu=palu, mesh=mesh)
    self._graphdef, self._state = nnx.split(model)
    self._place = jnp.asarray
    if mesh is None:
      self._base = {n: jnp.asarray(params[n], jnp.float32)
                    for n in self.targets}
    else:
      from palu_jax.sharding.mesh import named_sharding
      from palu_jax.sharding.shard import flat_shardings, put
      where = flat_shardings(self._state, mesh)
      self._base = {n: put(np.asarray(params[n], np.float32), where[n])
                    for n in self.targets}
      self._place = lambda micro: put(micro, named_sharding(
          (None, "batch", None), micro.shape, mesh, name="LoRA micro-batch"))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.lr, train.warmup, train.steps, 0.0)
    self.optimizer = optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(schedule, weight_decay=train.weight_decay))
    self._step = jax.jit(self._train_step)

  def init_state(self) -> dict[str, Any]:
    adapters = init_adapters(self.targets, self.lora, self.train.seed)
    return {"adapters": adapters, "opt": self.optimizer.init(adapters),
            "losses": np.zeros((self.train.steps,), np.float32)}

  @property
  def frozen(self):
    """(model state, float32 target weights): passed into the jitted
    functions as arguments, so NNX rebuilds the model inside their trace."""
    return self._state, self._base

  def loss(self, frozen, adapters: Adapters, tokens: Array) -> Array:
    """Mean next-token NLL of tokens [B, T] with the adapters applied."""
    model = with_adapters(self._graphdef, frozen[0], frozen[1], adapters,
                          self.lora.scale, self.dtype)
    return jnp.mean(next_token_nll(model, tokens))

  def _train_step(self, frozen, adapters, opt_state, micro: Array):
    """micro [A, B/A, T] -> (adapters, opt_state, mean loss): gradients
    averaged over the A micro-batches."""
    grad_fn = jax.value_and_grad(self.loss, argnums=1)

    def one(acc, tokens):
      loss, grads = grad_fn(frozen, adapters, tokens)
      return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, adapters))
    (loss, grads), _ = jax.lax.scan(one, zeros, micro)
    n = micro.shape[0]
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = self.optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss / n

  def fit(self, sequences: np.ndarray, *, checkpoint_dir: str | None = None,
          stop_after: int | None = None, progress: bool = True
          ) -> tuple[Adapters, np.ndarray]:
    """Trains to `train.steps` (resuming from the latest checkpoint in
    `checkpoint_dir`); returns (adapters, per-step losses).

    stop_after: return after this global step (tests interrupt with it).
    """
    t = self.train
    sequences = np.asarray(sequences, np.int32)
    if sequences.ndim != 2 or sequences.shape[1] != t.seqlen:
      raise PaluError(f"sequences must be [N, {t.seqlen}], got "
                      f"{sequences.shape}")
    state, start = self.init_state(), 0
    manager = None
    if checkpoint_dir is not None:
      manager = _manager(checkpoint_dir, t, self.lora)
      if manager.latest_step() is not None:
        start = manager.latest_step()
        state = _restore(manager, start, state)
        log.info("resuming from step %d of %s", start, checkpoint_dir)
    adapters, opt_state = state["adapters"], state["opt"]
    losses = np.array(state["losses"], np.float32)
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    tokens = t.batch_size * t.seqlen
    bar = tqdm(total=t.steps, initial=start, desc="LoRA", unit="step",
               disable=not progress)
    for step in range(start, end):
      tick = time.perf_counter()
      batch = batch_at(sequences, step, t.batch_size, t.seed)
      micro = self._place(batch.reshape(t.grad_accum, -1, t.seqlen))
      adapters, opt_state, loss = self._step(self.frozen, adapters,
                                             opt_state, micro)
      losses[step] = float(loss)
      if not np.isfinite(losses[step]):
        raise PaluError(f"LoRA loss is {losses[step]} at step {step}; lower "
                        "--lr or use --dtype float32")
      bar.set_postfix(loss=f"{losses[step]:.3f}",
                      tok_s=f"{tokens / (time.perf_counter() - tick):.0f}")
      bar.update(1)
      done = step + 1
      if manager is not None and (done % t.checkpoint_every == 0
                                  or done == t.steps):
        manager.save(done, args=_save_args(
            {"adapters": adapters, "opt": opt_state, "losses": losses}))
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    return adapters, losses


def _manager(directory: str, train: TrainConfig, lora: LoraConfig):
  """An orbax CheckpointManager over `directory`, refusing one written by a
  run with other settings (its steps would not line up)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  settings = {"train": train.to_dict(), "lora": lora.to_dict()}
  marker = os.path.join(directory, "run.json")
  if os.path.exists(marker):
    with open(marker) as f:
      old = json.load(f)
    if old != json.loads(json.dumps(settings)):
      raise ConfigError("checkpoint_dir", f"{directory} holds a run with "
                        f"other settings ({old}); use another --ckpt-dir")
  else:
    from palu_jax.checkpoint import atomic_write_text
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(marker, json.dumps(settings, indent=1) + "\n")
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=train.keep, enable_async_checkpointing=False))


def _key(name: str) -> str:
  return name.replace(".", "~")     # orbax joins tree paths with dots


def _save_args(state):
  import orbax.checkpoint as ocp
  tree = dict(state, adapters={_key(k): v for k, v in
                               state["adapters"].items()})
  return ocp.args.StandardSave(tree)


def _restore(manager, step: int, template):
  import orbax.checkpoint as ocp
  tree = dict(template, adapters={_key(k): v for k, v in
                                  template["adapters"].items()})
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  got = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  back = {_key(k): k for k in template["adapters"]}
  return dict(got, adapters={back[k]: v for k, v in got["adapters"].items()})


