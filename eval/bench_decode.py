"""Decode throughput and peak memory against the HBM read bound.

For each model shape, batch and context, a cache is filled with random
values at the given length and the jitted decode loop of
`palu_jax.generate` (the one `Generator` runs) is timed. Next to it, in the
same run: the HBM bandwidth measured with a large copy, and the time to
read the weights once (and weights + KV cache) at that bandwidth.

  python -m eval.bench_decode [--models llama2-7b smollm2-135m] [--out DIR]

Weights are pseudo-random (decode speed does not depend on their values,
and SmolLM2's GGUF is not on the GPU machine); shapes are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from eval.report import markdown_table, write_results
from palu_jax.config import ModelConfig
from palu_jax.generate import CHUNK, DecodeState, decode_loop
from palu_jax.model import Transformer

SHAPES = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        head_dim=64, hidden_dim=1536, rope_theta=100000.0, max_seq_len=32768,
        tie_embeddings=True),
    "llama2-7b": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        head_dim=128, hidden_dim=11008, max_seq_len=32768),
    # Llama-2-70B's shape (issue 21's "70B-shaped model"): 80 layers, 64
    # query heads, 8 KV heads of 128; 138 GB of bf16 weights, so it is
    # built straight into its shards (`fill_sharded`)
    "llama2-70b": ModelConfig(
        vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        head_dim=128, hidden_dim=28672, max_seq_len=32768),
    "tiny": ModelConfig(  # CPU smoke test of this script
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, hidden_dim=128, max_seq_len=4096),
}


def _time(fn, repeats: int) -> float:
  """Median wall time of fn() (which must block until the device is done)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure_bandwidth(gib: float = 4.0, repeats: int = 20) -> dict[str, float]:
  """Device-memory bandwidth (bytes/s) of a streaming read (sum) and of an
  elementwise pass (read + write); the larger is the reference."""
  n = int(gib * 2**30) // 2
  x = _pseudo_random(jnp.float32(0), shape=(n,), dtype=jnp.bfloat16)
  read = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
  scale = jax.jit(lambda v: v * 1.5)
  out = {}
  for name, f, nbytes in (("read", read, x.nbytes),
                          ("read_write", scale, 2 * x.nbytes)):
    jax.block_until_ready(f(x))
    out[name] = nbytes / _time(lambda: jax.block_until_ready(f(x)), repeats)
  out["reference"] = max(out["read"], out["read_write"])
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"),
                   donate_argnames=("init",))
def _decode(graphdef, state, init, *, steps):
  return decode_loop(graphdef, state, init, jnp.float32(0), jnp.int32(0),
                     jnp.float32(1), jnp.asarray([-1], jnp.int32),
                     jnp.int32(0), max_new_tokens=steps, greedy=True)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _pseudo_random(seed, *, shape, dtype):
  """Cheap non-zero values in [-0.05, 0.05): a hash of the element index.

  `jax.random` programs over multi-GiB arrays compiled for minutes on the
  GPU; decode speed does not depend on the values, only on their not being
  all zeros. The index is built per dimension (no reshape of a flat iota),
  so a sharded output is computed shard by shard (`fill_sharded`).
  """
  i = jnp.zeros(shape, jnp.float32)
  stride = 1.0
  for d in reversed(range(len(shape))):
    i = i + jax.lax.broadcasted_iota(jnp.float32, shape, d) * stride
    stride *= shape[d]
  x = jnp.sin(i * 0.6180339 + seed) * 43758.5453
  return ((x - jnp.floor(x) - 0.5) * 0.1).astype(dtype)


def _fill(tree, seed: int):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = [_pseudo_random(jnp.float32(seed + k), shape=x.shape, dtype=x.dtype)
         for k, x in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _sharded_filler(shape, dtype, sharding):
  return jax.jit(functools.partial(_pseudo_random, shape=shape, dtype=dtype),
                 out_shardings=sharding)


def fill_sharded(state, mesh, seed: int):
  """`_fill` of an abstract NNX state, each parameter computed straight
  into its shards on `mesh` (its logical axes), so no device ever holds a
  whole sharded weight: a 70B-shaped model does not fit one device. The
  values equal `_fill`'s."""
  from palu_jax.sharding.shard import variable_sharding
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  variables, treedef = jax.tree_util.tree_flatten(state, is_leaf=is_var)
  out = []
  for k, var in enumerate(variables):
    x = var.get_value()
    fill = _sharded_filler(tuple(x.shape), jnp.dtype(x.dtype),
                           variable_sharding(var, mesh))
    out.append(var.replace(fill(jnp.float32(seed + k))))
  return jax.tree_util.tree_unflatten(treedef, out)


def bench_model(cfg: ModelConfig, dtype) -> Transformer:
  """A model of `cfg`'s exact shapes with pseudo-random weights."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, _fill(state, 0))


def cache_len(ctx: int, steps: int) -> int:
  """Cache rows a timed run needs: context + steps + the chunk slack."""
  return ctx + steps + CHUNK


def _random_cache(model, *, batch, max_len, mesh=None):
  """An empty cache whose buffers hold non-zero values (never time zeros).

  Built in one jitted program, so the zero buffers of `init_cache` are never
  materialized next to the filled ones (at 64K context that doubled the
  cache's memory and ran out of it); with `mesh`, straight into its shards
  (`cache_shardings`), as no device could hold a 70B model's whole cache."""
  def build():
    cache = model.init_cache(batch, max_len)
    return cache.replace(layers=_fill(cache.layers, 1000))
  if mesh is None:
    return jax.jit(build)()
  from palu_jax.sharding.shard import cache_shardings
  return jax.jit(build, out_shardings=cache_shardings(
      jax.eval_shape(build), mesh))()


def weight_read_bytes(model) -> int:
  """Bytes a decode step must read: every weight except the embedding table,
  of which only B rows are read (unless it doubles as the LM head)."""
  _, state = nnx.split(model)
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  if model.lm_head is not None:
    total -= model.embed.embedding[...].nbytes
  return total


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def per_device_bytes(tree) -> int:
  """Bytes the first device holds of a pytree of (sharded) arrays."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
             for s in x.addressable_shards if s.device == dev)


def bench_one(model, graphdef, state, *, batch, ctx, steps, repeats, bw,
              mesh=None):
  """Times the jitted decode loop. With `mesh`, the parameters and the
  cache are sharded on it (`palu_jax.sharding.shard`) and the loop is
  traced under it (the latent kernels then run per device)."""
  cfg = model.cfg
  if steps % CHUNK:
    raise ValueError(f"--steps must be a multiple of {CHUNK}")
  cache = _random_cache(model, batch=batch, max_len=cache_len(ctx, steps),
                        mesh=mesh)
  scope = contextlib.nullcontext()
  if mesh is not None:
    from palu_jax.sharding.shard import shard_state
    state = shard_state(state, mesh)   # a no-op for `fill_sharded` states
    scope = jax.set_mesh(mesh)
  def fresh(cache):  # new arrays each time: the loop state is donated
    return DecodeState(
        cache=cache.replace(lengths=jnp.full((batch,), ctx, jnp.int32)),
        tokens=jnp.zeros((batch, steps + CHUNK), jnp.int32),
        last=jnp.arange(batch, dtype=jnp.int32) + 5, step=jnp.int32(0),
        done=jnp.zeros((batch,), bool), key=jax.random.key(0))
  with scope:
    t0 = time.perf_counter()
    holder = [_decode(graphdef, state, fresh(cache), steps=steps)]  # compile
    jax.block_until_ready(holder[0])
    first_s = time.perf_counter() - t0

    def run():
      holder[0] = _decode(graphdef, state, fresh(holder[0].cache),
                          steps=steps)
      jax.block_until_ready(holder[0].tokens)
    seconds = _time(run, repeats)
  step_s = seconds / steps
  w_bytes = weight_read_bytes(model)
  kv_bytes = batch * (ctx + steps / 2) * kv_bytes_per_token(cfg, model.dtype)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      "batch": batch, "context": ctx, "steps": steps,
      "ms_per_step": 1e3 * step_s,
      "tokens_per_s": batch / step_s,
      "weight_read_ms": 1e3 * w_bytes / bw,
      "weight_kv_read_ms": 1e3 * (w_bytes + kv_bytes) / bw,
      "frac_of_weight_bound": (w_bytes / bw) / step_s,
      "frac_of_weight_kv_bound": ((w_bytes + kv_bytes) / bw) / step_s,
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
      "first_call_s": first_s,
      "weight_bytes_per_device": per_device_bytes(state),
      "cache_bytes_per_device": per_device_bytes(holder[0].cache),
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama2-7b"],
                  choices=sorted(SHAPES))
  ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  ap.add_argument("--contexts", nargs="+", type=int,
                  default=[1024, 2048, 4096, 8192, 16384])
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--bandwidth-gib", type=float, default=4.0)
  ap.add_argument("--out", default="eval/results")
  ap.add_argument("--name", default="bench_decode")
  args = ap.parse_args(argv)

  device = jax.devices()[0]
  bws = measure_bandwidth(args.bandwidth_gib)
  bw = bws["reference"]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  print(f"device: {device.device_kind}  measured bandwidth: read "
        f"{bws['read'] / 1e9:.0f} GB/s, read+write {bws['read_write'] / 1e9:.0f}"
        f" GB/s", flush=True)
  rows = []
  cols = ["model", "batch", "context", "ms_per_step", "tokens_per_s",
          "weight_read_ms", "weight_kv_read_ms", "frac_of_weight_bound",
          "frac_of_weight_kv_bound", "peak_gib", "note"]
  header = (f"# Decode throughput ({args.dtype}, greedy, {args.steps} steps)\n\n"
            f"Device: {device.device_kind}; measured HBM bandwidth "
            f"{bw / 1e9:.0f} GB/s (best of a 4 GiB streaming sum and an "
            "elementwise pass counting read + write). "
            "`frac_of_*_bound` = bound time / measured step time. Peak memory "
            "is the process peak after the row (rows run in ascending size).\n\n")

  def save():  # after every row, so a time-out keeps what was measured
    payload = {"device": device.device_kind, "platform": platform.platform(),
               "jax": jax.__version__, "bandwidth_bytes_per_s": bws,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "dtype": args.dtype, "steps": args.steps, "rows": rows}
    return write_results(args.out, args.name, payload,
                         header + markdown_table(rows, cols))

  for name in args.models:
    cfg = SHAPES[name]
    t0 = time.perf_counter()
    model = bench_model(cfg, jnp.dtype(args.dtype))
    print(f"{name}: weights filled in {time.perf_counter() - t0:.1f}s", flush=True)
    graphdef, state = nnx.split(model)
    w_total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    combos = sorted(((b, c) for b in args.batches for c in args.contexts),
                    key=lambda bc: bc[0] * bc[1])  # ascending memory
    for batch, ctx in combos:
      need = w_total + batch * cache_len(ctx, args.steps) * kv_bytes_per_token(
          cfg, model.dtype)
      row = {"model": name, "batch": batch, "context": ctx}
      if limit and need > 0.92 * limit:
        row["note"] = f"does not fit: needs {need / 2**30:.0f} GiB"
      else:
        try:
          row.update(bench_one(model, graphdef, state, batch=batch, ctx=ctx,
                               steps=args.steps, repeats=args.repeats, bw=bw))
        except jax.errors.JaxRuntimeError as e:  # out of memory
          row["note"] = f"failed: {str(e).splitlines()[0][:80]}"
      rows.append(row)
      save()
      print({k: (round(v, 3) if isinstance(v, float) else v)
             for k, v in row.items()}, flush=True)
    del model, graphdef, state
  paths = save()
  print(header + markdown_table(rows, cols))
  print("wrote", *paths)
  return 0


if __name__ == "__main__":
  sys.exit(main())
