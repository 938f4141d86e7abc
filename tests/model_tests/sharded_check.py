"""Run in a process with 8 CPU devices (test_sharded_model.py starts it):
the same models, single device vs sharded on four meshes; prints JSON."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.perplexity import perplexity
from eval.zeroshot.scoring import score_token_pairs
from palu_jax.config import ModelConfig, PaluConfig
from palu_jax.generate import Generator
from palu_jax.model import Transformer
from palu_jax.sharding.mesh import make_mesh
from palu_jax.sharding.shard import (batch_sharding, cache_shardings,
                                     shard_state)

MESHES = ("data=8", "model=8", "data=2,model=4", "data=4,model=2")
CFG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8,
                  n_kv_heads=4, head_dim=16, hidden_dim=128, max_seq_len=256,
                  qkv_bias=True)


def palu(bits):
  ranks = ((8,) * 4,) * CFG.n_layers      # M-LRD: one group per KV head
  return PaluConfig(group_size=1, k_ranks=ranks, v_ranks=ranks,
                    kv_bits=bits, quant_group=8)


MODELS = {"dense": None, "palu16": palu(16), "palu_int4": palu(4),
          "palu_fp8": palu(8)}
# greedy generation (a compile of the whole decode loop each) on a subset
GREEDY = {("dense", "data=4,model=2"), ("palu16", "model=8"),
          ("palu16", "data=2,model=4"), ("palu_int4", "data=2,model=4")}
# the same through the decode-kernel path (its jnp backend on CPU) run per
# device by shard_map: 4 groups over model=4 / model=2, batch over data;
# int4 and float8 codes with their scales split by group like 16-bit ones
KERNEL_GREEDY = {("palu16", "data=2,model=4"), ("palu16", "data=4,model=2"),
                 ("palu_int4", "data=2,model=4"), ("palu_fp8", "data=4,model=2")}


def main():
  logging.disable(logging.WARNING)      # replication warnings (model=8)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (8, 12)), jnp.int32)
  prompts = [list(rng.integers(1, 256, n)) for n in (5, 9, 3, 7, 12, 4, 6,
                                                       10)]
  out = {"devices": len(jax.devices()), "greedy_runs": len(GREEDY),
         "kernel_greedy_runs": len(KERNEL_GREEDY)}
  for name, pc in MODELS.items():
    model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(1), palu=pc)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok)[0])
    want = np.asarray(run(state, tokens))
    want_ids = Generator(model).generate_ids(prompts, max_new_tokens=8)
    for spec in MESHES:
      mesh = make_mesh(spec)
      sharded = shard_state(state, mesh)
      tok = jax.device_put(tokens, batch_sharding(tokens.shape, mesh,
                                                  name="tokens"))
      got = np.asarray(run(sharded, tok))
      q = sharded["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
      layer = cache_shardings(model.init_cache(8, 64), mesh).layers[0]
      row = {
          "max_abs_diff": float(np.max(np.abs(got - want))),
          "max_abs": float(np.max(np.abs(want))),
          "q_spec": list(q.sharding.spec),
          "q_shard_shape": list(q.addressable_shards[0].data.shape),
          "cache_specs": {k: list(v.spec) for k, v in vars(layer).items()
                          if hasattr(v, "spec")},
      }
      if (name, spec) in GREEDY:
        row["same_tokens"] = Generator(model, mesh=mesh).generate_ids(
            prompts, max_new_tokens=8) == want_ids
      if (name, spec) in KERNEL_GREEDY:
        kernel_model = nnx.merge(graphdef, state)
        kernel_model.set_attention_implementation("mosaic_gpu")  # -> jnp
        row["same_tokens_kernel_path"] = Generator(
            kernel_model, mesh=mesh).generate_ids(
                prompts, max_new_tokens=8) == want_ids
      out[f"{name}|{spec}"] = row
    # data-parallel perplexity (windows over "data")
    ids = rng.integers(0, 256, 16 * 32)
    one = perplexity(model, ids, seqlen=32, batch_size=4, progress=False)
    many = perplexity(model, ids, seqlen=32, batch_size=4, progress=False,
                      mesh=make_mesh("data=4,model=2"))
    out[f"{name}|ppl"] = [one.nll, many.nll]
    # zero-shot scoring (the log-likelihood of continuations), rows over data
    pairs = [(list(rng.integers(1, 256, n)), list(rng.integers(1, 256, 3)))
             for n in (4, 9, 13, 6, 11, 5)]
    one = score_token_pairs(model, pairs, batch_size=4, progress=False)
    many = score_token_pairs(model, pairs, batch_size=4, progress=False,
                             mesh=make_mesh("data=4,model=2"))
    out[f"{name}|zeroshot"] = {
        "max_abs_diff": max(abs(a.logprob - b.logprob)
                            for a, b in zip(one, many)),
        "same_greedy": [a.is_greedy for a in one] == [b.is_greedy for b in many]}
  out["orbax"] = orbax_round_trip()
  out["calibration"] = calibration_check(rng)
  out["svd"] = svd_spread_check(rng)
  out["lora"] = lora_check(rng)
  print(json.dumps(out, default=str))


def svd_spread_check(rng):
  """A layer's group SVDs spread over the 8 devices (one each, dispatched
  together) against the same SVDs one at a time on device 0."""
  from palu_jax.decompose.svd import factorize, factorize_many
  x = rng.standard_normal((256, 32))
  gram = jnp.asarray(x.T @ x, jnp.float32)
  ws = [rng.standard_normal((32, 16)) for _ in range(8)]
  metric = [None, np.tril(rng.standard_normal((16, 16))) + 4 * np.eye(16)] * 4
  spread = factorize_many(ws, gram, out_factors=metric)
  diff = 0.0
  for w, m, got in zip(ws, metric, spread):
    with jax.default_device(jax.devices()[0]):
      want = factorize(w, gram, out_factor=m)
    # singular vectors are unique up to sign: compare rank-5 products
    low = lambda f: np.asarray(f.truncate(5).down) @ np.asarray(
        f.truncate(5).up)
    diff = max(diff, float(np.abs(low(got) - low(want)).max()
                           / np.abs(low(want)).max()),
               float(np.abs(np.asarray(got.singular) - np.asarray(
                   want.singular)).max() / float(want.singular[0])))
  return {"matrices": len(spread), "devices": len(jax.local_devices()),
          "rel_diff": diff}


def calibration_check(rng):
  """Gram matrices and Fisher scores of the dense model, one device vs
  data-parallel on a 4x2 mesh (batches of 4 windows)."""
  from palu_jax.calibrate.activations import kv_input_grams
  from palu_jax.calibrate.fisher import kv_fisher
  model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(3))
  windows = rng.integers(0, 256, (8, 24))
  mesh = make_mesh("data=4,model=2")
  g1, n1 = kv_input_grams(model, windows, batch_size=4, progress=False)
  g8, n8 = kv_input_grams(model, windows, batch_size=4, progress=False,
                          mesh=mesh)
  f1 = kv_fisher(model, windows, batch_size=4, progress=False)
  f8 = kv_fisher(model, windows, batch_size=4, progress=False, mesh=mesh)
  return {"tokens": [n1, n8],
          "gram_rel_diff": float(np.max(np.abs(g8 - g1)) / np.max(np.abs(g1))),
          "fisher_keys_equal": sorted(f1) == sorted(f8),
          "fisher_rel_diff": max(abs(f8[k] - f1[k]) / abs(f1[k]) for k in f1),
          "fisher_modules": len(f1)}


def lora_check(rng):
  """Two LoRA steps on the Palu model, one device vs a 2x4 mesh."""
  from palu_jax.lora.adapters import LoraConfig
  from palu_jax.lora.train import LoraTrainer, TrainConfig
  pc = MODELS["palu16"]
  model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(4), palu=pc)
  params = {".".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model))}
  train = TrainConfig(steps=2, warmup=0, batch_size=8, grad_accum=2,
                      seqlen=16, compute_dtype="float32", lr=1e-2)
  seqs = rng.integers(0, 256, (32, 16))
  runs = []
  for mesh in (None, make_mesh("data=2,model=4")):
    trainer = LoraTrainer(CFG, params, pc, LoraConfig(rank=4), train,
                          mesh=mesh)
    adapters, losses = trainer.fit(seqs, progress=False)
    runs.append((jax.tree.map(np.asarray, adapters), losses))
  (a1, l1), (a8, l8) = runs
  diffs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)),
      a1, a8))
  return {"losses": [l1.tolist(), l8.tolist()],
          "adapter_rel_diff": max(diffs), "adapters": len(diffs)}


def orbax_round_trip():
  """A Palu model saved from a 2x4 mesh, restored (straight into shards)
  onto 1x8 and 8x1 meshes: every parameter equal, laid out for the new
  mesh."""
  import os
  import tempfile
  from palu_jax.api import load_model
  from palu_jax.checkpoint import save_model
  pc = MODELS["palu16"]
  model = Transformer(CFG, dtype=jnp.float32, rngs=nnx.Rngs(2), palu=pc)
  _, state = nnx.split(model)
  nnx.update(model, shard_state(state, make_mesh("data=2,model=4")))
  flat = {".".join(map(str, k)): v.get_value()
          for k, v in nnx.to_flat_state(nnx.state(model))}
  saved_spec = list(flat["layers.0.attn.k_down"].sharding.spec)
  res = {"saved_k_down_spec": saved_spec}
  # from host arrays straight into shards (a source that is not a model
  # directory: `from_params(..., mesh=)`)
  from palu_jax.model import from_params
  host = {k: np.asarray(v) for k, v in flat.items()}
  placed = from_params(CFG, host, dtype=jnp.float32, palu=pc,
                       mesh=make_mesh("model=8"))
  got = {".".join(map(str, k)): v.get_value()
         for k, v in nnx.to_flat_state(nnx.state(placed))}
  res["from_params"] = {
      "max_abs_diff": max(float(np.max(np.abs(np.asarray(got[k]) - host[k])))
                          for k in host),
      "q_shard": list(got["layers.0.attn.q_proj.kernel"]
                      .addressable_shards[0].data.shape)}
  with tempfile.TemporaryDirectory() as tmp:
    path = save_model(os.path.join(tmp, "m"), CFG, flat,
                      meta={"kind": "palu", "palu": pc.to_dict()})
    for spec in ("model=8", "data=8"):
      back, _ = load_model(path, dtype="float32", mesh=make_mesh(spec))
      got = {".".join(map(str, k)): v.get_value()
             for k, v in nnx.to_flat_state(nnx.state(back))}
      res[spec] = {
          "same_keys": sorted(got) == sorted(flat),
          "max_abs_diff": max(float(np.max(np.abs(np.asarray(got[k]) -
                                                   np.asarray(flat[k]))))
                              for k in flat),
          "k_down_spec": list(got["layers.0.attn.k_down"].sharding.spec),
          "k_down_shard": list(got["layers.0.attn.k_down"]
                               .addressable_shards[0].data.shape),
      }
  return res


if __name__ == "__main__":
  main()
