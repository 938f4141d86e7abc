"""The `palu-jax` command line (the composition root: may import anything).

  palu-jax convert SRC OUT
  palu-jax compress MODEL --ratio 0.5 --mode jlrd --alloc fisher --out DIR
  palu-jax compress MODEL --method eigen --eps 0.025 --out DIR
  palu-jax generate MODEL --prompt TEXT [--chat] --max-new-tokens N ...
  palu-jax ppl MODEL --dataset {wikitext2,c4,tinystories,PATH} --seqlen N
  palu-jax eval --models base=DIR palu50=DIR2 --tasks ppl,zeroshot,needle
  palu-jax finetune DIR --steps 500 --lr 2e-4 --out DIR2
  palu-jax demo
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time

from eval.cli_types import (HelpFormatter, Parser, mesh_spec, nonneg_float,
                            nonneg_int, open_fraction, positive_float,
                            positive_int, quant_group, top_p)
from palu_jax.errors import PaluError


def _jax_backend() -> str:
  import jax
  return jax.default_backend()


def _check_data_dir(args) -> None:
  """Before any work: a dataset given as a file path never consults the
  data root, so the command checks the root itself."""
  from palu_jax.data import check_data_dir
  check_data_dir(getattr(args, "data_dir", None))


def cmd_convert(args) -> int:
  from palu_jax.checkpoint import convert_checkpoint
  t = time.perf_counter()
  out = convert_checkpoint(args.src, args.out, overwrite=args.overwrite)
  print(f"converted {args.src} -> {out} in {time.perf_counter() - t:.1f}s")
  return 0


def compression_config(args):
  """The compress command's flags (over a --preset, over the defaults or
  --palu) -> CompressionConfig or EigenConfig; misplaced flags raise
  ConfigError naming them."""
  from palu_jax.compress import CompressionConfig
  from palu_jax.eigen.compress import EigenConfig
  from palu_jax.errors import ConfigError
  palu_only = ("mode", "group_size", "alloc", "whiten", "k_fraction",
               "shared_kv", "k_weight", "rope_span")
  eigen_only = ("eps", "step", "floor", "error_windows")
  common = ("ratio", "multiple", "hadamard", "kv_bits", "quant_group",
            "k_up_bits")
  method = args.method
  preset = {}
  if args.preset is not None:
    if method == "eigen":
      raise ConfigError("preset", "--preset picks Palu settings; it does "
                        "not apply to --method eigen")
    from palu_jax.compression_presets import preset_fields
    preset = preset_fields(args.preset)
  kv_bits = args.kv_bits if args.kv_bits is not None else preset.get(
      "kv_bits")
  if args.hadamard and kv_bits in (None, 16):
    # the rotation leaves a 16-bit model unchanged: asking for it alone is
    # a mistake (the API keeps it, for tests of that very invariance)
    raise ConfigError("hadamard", "--hadamard only helps quantized latents: "
                      "pass --kv-bits 8/4/3/2 with it")
  if args.group_size is not None and (args.mode or preset.get("mode")) != \
      "glrd":
    raise ConfigError("group_size", "--group-size applies to --mode glrd "
                      "only; pass --mode glrd with it")
  wrong = [n for n in (palu_only if method == "eigen" else eigen_only)
           if getattr(args, n) is not None] + (
               ["palu"] if method == "eigen" and args.palu else [])
  if wrong:
    raise ConfigError("method", f"--{wrong[0].replace('_', '-')} does not "
                      f"apply to --method {method}")
  given = {**preset, **{name: getattr(args, name) for name in common + (
      eigen_only if method == "eigen" else palu_only)
      if getattr(args, name) is not None}}   # flags override the preset
  if method == "eigen":
    return EigenConfig(**given)
  return (CompressionConfig.palu(**given) if args.palu
          else CompressionConfig(**given))


def cmd_compress(args) -> int:
  from palu_jax.compress import CalibrationConfig
  from palu_jax.pipeline import compress_checkpoint
  _check_data_dir(args)
  comp = compression_config(args)
  calib = CalibrationConfig(dataset=args.calib_dataset,
                            windows=args.calib_windows,
                            seqlen=args.calib_seqlen,
                            fisher_windows=args.fisher_windows,
                            seed=args.seed, batch_size=args.batch_size)
  cache = None if args.no_calib_cache else args.calib_cache
  mesh = _mesh(args)
  t = time.perf_counter()
  out, report = compress_checkpoint(args.model, args.out, comp, calib,
                                    dtype=args.dtype, cache_dir=cache,
                                    data_dir=args.data_dir,
                                    overwrite=args.overwrite, mesh=mesh)
  print(f"compressed {args.model} -> {out} in {time.perf_counter() - t:.1f}s "
        f"(calibration {report['calibration_seconds']:.1f}s, decomposition "
        f"{report['compress_seconds']:.1f}s)")
  print(f"KV cache: {report['kv_bytes_per_token']} B/token, "
        f"{report['kept_fraction']:.1%} of the dense "
        f"{report['dense_kv_bytes_per_token']} B/token; ranks in "
        f"{os.path.join(out, 'ranks.md')}")
  return 0


def cmd_finetune(args) -> int:
  _check_data_dir(args)
  from eval.plots import loss_png
  from palu_jax.lora.adapters import LoraConfig
  from palu_jax.lora.pipeline import finetune_checkpoint
  from palu_jax.lora.train import TrainConfig
  lora = LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(
      t for t in args.targets.split(",") if t) if args.targets else None)
  train = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup,
                      batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seqlen=args.seqlen, weight_decay=args.weight_decay,
                      compute_dtype=args.dtype, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, keep=args.keep)
  out, log = finetune_checkpoint(
      args.model, args.out, lora, train, dataset=args.dataset,
      data_dir=args.data_dir, checkpoint_dir=args.ckpt_dir,
      overwrite=args.overwrite, plot=loss_png, mesh=_mesh(args))
  first, last = log["losses"][0], log["losses"][-1]
  print(f"fine-tuned {args.model} -> {out}: {log['steps']} steps, "
        f"{log['tokens']} tokens in {log['seconds']}s; loss {first:.4f} -> "
        f"{last:.4f}; adapters on {len(log['targets'])} parameters")
  return 0


def render_chat(tokenizer, prompt: str) -> str:
  """Applies the tokenizer's chat template to one user message."""
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    raise PaluError("--chat: this model's tokenizer has no chat template")
  import jinja2
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(template).render(
      messages=[{"role": "user", "content": prompt}],
      add_generation_prompt=True, bos_token="", eos_token="")


def _mesh(args):
  """The --mesh flag as a device mesh (None without the flag: one device)."""
  if getattr(args, "mesh", None) is None:
    return None
  from palu_jax.sharding.mesh import make_mesh
  return make_mesh(args.mesh)


def cmd_generate(args) -> int:
  from palu_jax.api import load_model
  from palu_jax.generate import Generator
  from palu_jax.sampling import SamplingConfig
  mesh = _mesh(args)                       # a bad mesh fails before loading
  model, tok = load_model(args.model, dtype=args.dtype)
  if tok is None:
    raise PaluError(f"{args.model}: no tokenizer found next to the checkpoint")
  text = render_chat(tok, args.prompt) if args.chat else args.prompt
  ids = tok.encode(text)
  if not ids:
    raise PaluError("--prompt is empty: give some text (or a BOS-adding "
                    "tokenizer)")
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p)
  gen = Generator(model, mesh=mesh)
  if not args.chat:
    print(args.prompt, end="", flush=True)
  produced: list[int] = []
  # Decode prompt + continuation and print the new suffix, so tokenizers that
  # strip a leading space at the start of a decode still stream correctly.
  prefix = tok.decode(ids)
  shown = [prefix]

  def stream(step, new_ids):
    t = int(new_ids[0])
    stopped = bool(produced) and produced[-1] in gen.eos_ids
    produced.append(t)
    if stopped or t in gen.eos_ids:
      return
    text_now = tok.decode(ids + produced)
    # Hold back partial UTF-8 sequences until they complete.
    if not text_now.endswith("\ufffd"):
      print(text_now[len(shown[0]):], end="", flush=True)
      shown[0] = text_now

  start = time.perf_counter()
  gen.generate_ids([ids], max_new_tokens=args.max_new_tokens,
                   sampling=sampling, seed=args.seed, on_token=stream)
  elapsed = time.perf_counter() - start
  print()
  print(f"[{len(produced)} tokens in {elapsed:.2f}s, compile included]",
        file=sys.stderr)
  return 0


def cmd_ppl(args) -> int:
  from eval.perplexity import perplexity
  from palu_jax.api import load_model
  from palu_jax.data import load_text
  from palu_jax.output_paths import check_output_file_dir
  _check_data_dir(args)
  if args.out:                         # before, not after, the evaluation
    check_output_file_dir(args.out)
  mesh = _mesh(args)
  model, tok = load_model(args.model, dtype=args.dtype)
  if tok is None:
    raise PaluError(f"{args.model}: no tokenizer found next to the checkpoint")
  ids = tok.encode(load_text(args.dataset, data_dir_override=args.data_dir),
                   add_bos=False)
  r = perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size,
                 limit=args.limit, mesh=mesh)
  total = len(ids) // args.seqlen
  print(f"dataset: {args.dataset}  windows: {r.windows}/{total}  "
        f"tokens: {r.tokens}  nll: {r.nll:.5f}")
  if args.out:
    from eval.report import markdown_table, write_results
    row = {"model": args.model, "dataset": args.dataset, "seqlen": r.seqlen,
           "dtype": args.dtype, "windows": r.windows, "tokens": r.tokens,
           "nll": r.nll, "perplexity": r.perplexity}
    name = f"ppl_{os.path.basename(os.path.normpath(args.model))}_{args.dataset}"
    write_results(args.out, name, {"rows": [row]},
                  markdown_table([row], list(row)))
  print(f"perplexity: {r.perplexity:.4f}")
  return 0


def cmd_eval(args) -> int:
  from eval.suite import ModelSpec, SuiteConfig, run_suite
  from palu_jax.output_paths import check_output_file_dir
  _check_data_dir(args)
  check_output_file_dir(args.out)
  cfg = SuiteConfig(tasks=tuple(t for t in args.tasks.split(",") if t),
                    limit=args.limit, ppl_seqlen=args.ppl_seqlen,
                    ppl_limit=args.ppl_limit,
                    needle_lengths=tuple(args.needle_lengths),
                    needle_samples=args.needle_samples,
                    longbench_limit=args.longbench_limit,
                    batch_size=args.batch_size, dtype=args.dtype,
                    data_dir=args.data_dir)
  models = [ModelSpec.parse(m) for m in args.models]
  out = os.path.join(args.out, args.name)
  run_suite(models, cfg, out, progress=not args.no_progress,
            mesh=_mesh(args))
  print(f"results: {os.path.join(out, 'results.md')}")
  return 0


def cmd_demo(args) -> int:
  """Convert SmolLM2-135M, compress its KV cache by half, compare perplexity,
  generate from the compressed model."""
  from palu_jax.checkpoint import is_model_dir
  if not is_model_dir(args.out):
    # never replaces what is there: an existing non-model directory is an
    # error (output_paths.check_output_dir), not something to wipe
    cmd_convert(argparse.Namespace(src="smollm2-135m", out=args.out,
                                   overwrite=False))
  else:
    print(f"using the converted model in {args.out}")
  palu_dir = args.out.rstrip("/") + "-palu50"
  if not is_model_dir(palu_dir):
    print("\n== Palu: halve the KV cache (default settings)")
    cmd_compress(build_parser().parse_args(
        ["compress", args.out, "--out", palu_dir, "--overwrite"]))
  else:
    print(f"using the compressed model in {palu_dir}")
  on_gpu = _jax_backend() == "gpu"
  limit = None if on_gpu else args.cpu_windows
  note = "all windows" if limit is None else (
      f"first {limit} windows on CPU; a GPU runs all of them")
  for name, model in (("dense", args.out), ("Palu 50%", palu_dir)):
    print(f"\n== {name}: WikiText-2 perplexity, seqlen 2048, float32 ({note})")
    cmd_ppl(argparse.Namespace(model=model, dataset="wikitext2", seqlen=2048,
                               batch_size=1, limit=limit, dtype="float32",
                               data_dir=None, out=None))
  print("\n== Palu 50%: greedy continuation (bfloat16)")
  cmd_generate(argparse.Namespace(
      model=palu_dir, prompt="The capital of France is Paris. The capital of "
      "Germany is", chat=False, max_new_tokens=48, temperature=0.0, top_k=0,
      top_p=1.0, seed=0, dtype="bfloat16"))
  return 0


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("palu-jax")
  except metadata.PackageNotFoundError:
    return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
  p = Parser(prog="palu-jax", description=__doc__, formatter_class=HelpFormatter)
  p.add_argument("--version", action="version",
                 version=f"palu-jax {_version()}")
  p.add_argument("--coordinator", default=None,
                 help="host:port of process 0 of a multi-process (multi-host) "
                 "job; with --num-processes and --process-id [env "
                 "JAX_COORDINATOR_ADDRESS, or a cluster jax detects]")
  p.add_argument("--num-processes", type=positive_int, default=None,
                 help="processes in the job [env JAX_NUM_PROCESSES]")
  p.add_argument("--process-id", type=nonneg_int, default=None,
                 help="this process's index [env JAX_PROCESS_ID]")
  sub = p.add_subparsers(dest="command", required=True)
  parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
  overwrite_help = ("replace OUT if it is a palu-jax model directory (never "
                    "anything else)")
  seed_help = "random seed"
  data_dir_help = ("local data root (default: $PALU_JAX_DATA or "
                   "../shared/data); must exist")

  c = parser("convert", help="convert a checkpoint to a palu-jax dir")
  c.add_argument("src", help="HF dir, .gguf, llama2.c .bin, or smollm2-135m")
  c.add_argument("out", help="output model directory")
  c.add_argument("--overwrite", action="store_true", help=overwrite_help)
  c.set_defaults(fn=cmd_convert)

  dtype_help = "weights/activations dtype (norms, softmax, logits are f32)"
  k = parser("compress", help="Palu or Eigen Attention: low-rank latent KV "
             "cache")
  k.add_argument("model", help="model directory, checkpoint, or preset")
  k.add_argument("--out", required=True, help="output model directory")
  k.add_argument("--method", choices=["palu", "eigen"], default="palu",
                 help="Palu (low-rank k/v projections) or Eigen Attention "
                 "(calibrated per-layer bases, ranks by error budget)")
  k.add_argument("--eps", type=positive_float, default=None,
                 help="eigen: per-layer attention-output error budget "
                 "[0.025]; with --ratio, the budget decides instead")
  k.add_argument("--step", type=open_fraction, default=None,
                 help="eigen: energy-threshold step [0.02]")
  k.add_argument("--floor", type=positive_float, default=None,
                 help="eigen: smallest rank as a fraction of head_dim [0.45]")
  k.add_argument("--error-windows", type=positive_int, default=None,
                 help="eigen: calibration windows the errors are measured "
                 "on [8]")
  k.add_argument("--preset", choices=["fast", "balanced", "small"],
                 default=None, help="settings picked from the measured "
                 "configuration table (README: which configuration for which "
                 "goal); flags below still override")
  k.add_argument("--palu", action="store_true",
                 help="Palu as published (separate latents, input whitening, "
                 "Fisher ranks); flags below still override")
  k.add_argument("--ratio", type=open_fraction, default=None,
                 help="fraction of the KV cache removed, in (0, 1) [palu: "
                 "0.5; eigen: none, --eps decides]")
  k.add_argument("--mode", choices=["mlrd", "glrd", "jlrd"], default=None,
                 help="head groups: per head, per --group-size, all heads "
                 "[jlrd]")
  k.add_argument("--group-size", type=positive_int, default=None,
                 help="KV heads per group, with --mode glrd only [4]")
  k.add_argument("--alloc", choices=["uniform", "fisher", "error",
                                     "fisher-error"], default=None,
                 help="rank allocation across modules [uniform; --palu: "
                 "fisher]")
  k.add_argument("--whiten", choices=["none", "input", "attention"],
                 nargs="?", const="input", default=None,
                 help="SVD metric: plain, ‖XΔW‖ (Palu; a bare --whiten), or "
                 "attention-aware [attention; --palu: input]")
  k.add_argument("--no-whiten", dest="whiten", action="store_const",
                 const="none", help="plain SVD (same as --whiten none)")
  k.add_argument("--rank-multiple", dest="multiple", type=positive_int,
                 default=None, help="ranks are multiples of this [palu: 16; "
                 "eigen: 16, or head_dim/2 if smaller]")
  k.add_argument("--k-fraction", type=open_fraction, default=None,
                 help="separate latents: share of the budget for keys "
                 "[one pool]")
  k.add_argument("--shared-kv", dest="shared_kv", action="store_true",
                 default=None, help="one latent for keys and values [the "
                 "default; --palu: separate]")
  k.add_argument("--separate-kv", dest="shared_kv", action="store_false",
                 help="separate key and value latents [Palu's choice]")
  k.add_argument("--k-weight", type=positive_float, default=None,
                 help="shared latent: weight of key error vs value error [2]")
  k.add_argument("--rope-span", type=positive_int, default=None,
                 help="attention whitening: RoPE distances averaged [512]")
  k.add_argument("--hadamard", action="store_true", default=None,
                 help="fold a Walsh-Hadamard rotation into the latents "
                 "(with --kv-bits 8/4/3/2)")
  k.add_argument("--kv-bits", type=int, choices=[16, 8, 4, 3, 2],
                 default=None, help="latent cache precision: 8 = float8 e4m3 "
                 "codes, 4/3/2 = packed integer codes, each with a bf16 scale "
                 "per --quant-group [16]")
  k.add_argument("--k-up-bits", type=int, choices=[16, 8], default=None,
                 help="8: key up-projection B_k in e4m3 codes with a power-"
                 "of-two scale per column: with --kv-bits 8 the Mosaic GPU "
                 "kernel's fp8 key rebuild needs it (with 16, RoPE decoding "
                 "on Hopper falls back to a slower kernel) [16]")
  k.add_argument("--quant-group", type=quant_group, default=None,
                 help="latents per quantization group (per token), or "
                 "'group': one scale per token and latent group (the "
                 "float8 format the Mosaic GPU kernel reads) [group with "
                 "--kv-bits 8, else 32]")
  k.add_argument("--calib-dataset", default="wikitext2-calib",
                 help="calibration corpus name or .txt/.jsonl path")
  k.add_argument("--calib-windows", type=positive_int, default=32,
                 help="random calibration windows")
  k.add_argument("--calib-seqlen", type=positive_int, default=512,
                 help="tokens per calibration window (at most the model's "
                 "context)")
  k.add_argument("--fisher-windows", type=positive_int, default=None,
                 help="windows used for Fisher scores [all]")
  k.add_argument("--batch-size", type=positive_int, default=1,
                 help="calibration windows per forward pass")
  k.add_argument("--seed", type=nonneg_int, default=0, help=seed_help)
  k.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                 help="calibration dtype")
  k.add_argument("--calib-cache", default=os.path.join(
      os.path.expanduser("~"), ".cache", "palu_jax", "calibration"),
                 help="where calibration statistics are cached")
  k.add_argument("--no-calib-cache", action="store_true",
                 help="recompute calibration statistics, cache nothing")
  k.add_argument("--data-dir", default=None, help=data_dir_help)
  k.add_argument("--overwrite", action="store_true", help=overwrite_help)
  k.add_argument("--mesh", type=mesh_spec, default=None,
                 help="calibrate data-parallel on data=D,model=M devices "
                 "(windows over data; --batch-size a multiple of D) [one "
                 "device]")
  k.set_defaults(fn=cmd_compress)

  f = parser("finetune", help="LoRA recovery fine-tuning; writes the "
             "merged model (and the adapters)")
  f.add_argument("model", help="model directory (compressed or dense)")
  f.add_argument("--out", required=True, help="output model directory")
  f.add_argument("--steps", type=positive_int, default=500,
                 help="optimizer steps")
  f.add_argument("--lr", type=positive_float, default=2e-4,
                 help="peak learning rate")
  f.add_argument("--warmup", type=nonneg_int, default=50,
                 help="linear warmup steps (then cosine decay to 0)")
  f.add_argument("--batch-size", type=positive_int, default=8,
                 help="sequences per optimizer step")
  f.add_argument("--grad-accum", type=positive_int, default=1,
                 help="micro-batches per step (divides --batch-size)")
  f.add_argument("--seqlen", type=positive_int, default=512,
                 help="tokens per training sequence (at most the model's "
                 "context)")
  f.add_argument("--weight-decay", type=nonneg_float, default=0.0,
                 help="AdamW weight decay")
  f.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
  f.add_argument("--alpha", type=positive_float, default=16.0,
                 help="LoRA scale is alpha / rank")
  f.add_argument("--targets", default=None,
                 help="comma-separated parameter names [compressed: "
                 "k_down,k_up,v_down,o_latent; dense: q/k/v/o_proj]")
  f.add_argument("--dataset", default="wikitext2-calib",
                 help="corpus name or .txt/.jsonl path")
  f.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                 default="bfloat16", help="compute dtype (adapters and "
                 "optimizer state stay float32; on CPU use float32)")
  f.add_argument("--checkpoint-every", type=positive_int, default=100,
                 help="steps between training checkpoints")
  f.add_argument("--keep", type=positive_int, default=3,
                 help="checkpoints kept")
  f.add_argument("--ckpt-dir", default=None,
                 help="training checkpoints (resumed from) [OUT.ckpt]")
  f.add_argument("--seed", type=nonneg_int, default=0, help=seed_help)
  f.add_argument("--data-dir", default=None, help=data_dir_help)
  f.add_argument("--overwrite", action="store_true", help=overwrite_help)
  f.add_argument("--mesh", type=mesh_spec, default=None,
                 help="train data-parallel on data=D,model=M devices "
                 "(micro-batches over data) [one device]")
  f.set_defaults(fn=cmd_finetune)

  g = parser("generate", help="generate text (streams tokens)")
  g.add_argument("model", help="model directory, checkpoint, or preset")
  g.add_argument("--prompt", required=True, help="text to continue")
  g.add_argument("--chat", action="store_true",
                 help="wrap the prompt in the model's chat template")
  g.add_argument("--max-new-tokens", type=positive_int, default=64,
                 help="tokens generated at most")
  g.add_argument("--temperature", type=nonneg_float, default=0.0,
                 help="sampling temperature; 0 = greedy")
  g.add_argument("--top-k", type=nonneg_int, default=0,
                 help="sample from the k likeliest tokens; 0 = off")
  g.add_argument("--top-p", type=top_p, default=1.0,
                 help="nucleus sampling mass; 1 = off")
  g.add_argument("--seed", type=nonneg_int, default=0, help=seed_help)
  g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help=dtype_help)
  g.add_argument("--mesh", type=mesh_spec, default=None,
                 help="devices as data=D,model=M (batch over data, heads / "
                 "latent groups over model) [one device]")
  g.set_defaults(fn=cmd_generate)

  q = parser("ppl", help="perplexity (non-overlapping windows)")
  q.add_argument("model", help="model directory, checkpoint, or preset")
  q.add_argument("--dataset", default="wikitext2",
                 help="wikitext2, c4, tinystories, or a .txt/.jsonl path")
  q.add_argument("--seqlen", type=positive_int, default=2048,
                 help="tokens per window (at most the model's context)")
  q.add_argument("--limit", type=positive_int, default=None,
                 help="max windows [all]")
  q.add_argument("--batch-size", type=positive_int, default=1,
                 help="windows per forward pass")
  q.add_argument("--data-dir", default=None, help=data_dir_help)
  q.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                 help=dtype_help)
  q.add_argument("--out", default=None,
                 help="also write ppl_<model>_<dataset>.json/.md into this dir")
  q.add_argument("--mesh", type=mesh_spec, default=None,
                 help="devices as data=D,model=M (batch over data, heads / "
                 "latent groups over model) [one device]")
  q.set_defaults(fn=cmd_ppl)

  e = parser("eval", help="evaluate configurations side by side "
             "(resumable)")
  e.add_argument("--models", nargs="+", required=True,
                 help="NAME=DIR[@KV], KV a simulated baseline: kivi2, kivi4, "
                 "rtn4, rtn3, rtn2")
  e.add_argument("--tasks", default="ppl,zeroshot,needle",
                 help="comma list of ppl, zeroshot, needle, longbench")
  e.add_argument("--limit", type=positive_int, default=None,
                 help="zero-shot items per task [all]")
  e.add_argument("--ppl-seqlen", type=positive_int, default=2048,
                 help="perplexity window length")
  e.add_argument("--ppl-limit", type=positive_int, default=None,
                 help="perplexity windows per corpus [all]")
  e.add_argument("--needle-lengths", type=positive_int, nargs="+",
                 default=[2048, 4096, 8192, 16384, 32768],
                 help="needle-in-a-haystack context lengths")
  e.add_argument("--needle-samples", type=positive_int, default=2,
                 help="samples per (length, depth)")
  e.add_argument("--longbench-limit", type=positive_int, default=None,
                 help="LongBench items per task [all]")
  e.add_argument("--batch-size", type=positive_int, default=16,
                 help="sequences per forward pass")
  e.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                 help=dtype_help)
  e.add_argument("--data-dir", default=None, help=data_dir_help)
  e.add_argument("--name", default="suite",
                 help="results go to OUT/NAME/")
  e.add_argument("--out", default=os.path.join("eval", "results"),
                 help="results root")
  e.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
  e.add_argument("--mesh", type=mesh_spec, default=None,
                 help="perplexity and zero-shot data-parallel on "
                 "data=D,model=M devices [one device]")
  e.set_defaults(fn=cmd_eval)

  d = parser("demo", help="SmolLM2-135M: convert, compress, perplexity, "
             "generate")
  d.add_argument("--out", default="demo_out/smollm2-135m",
                 help="converted model directory (the compressed one goes "
                 "beside it, OUT-palu50)")
  d.add_argument("--cpu-windows", type=positive_int, default=8,
                 help="perplexity windows evaluated when no GPU is present")
  d.set_defaults(fn=cmd_demo)
  return p


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:     # bad flags (2), --help / --version (0)
    return e.code if isinstance(e.code, int) else 2
  try:
    from palu_jax.sharding.distributed import initialize
    initialize(args.coordinator, args.num_processes, args.process_id)
    return args.fn(args)
  except PaluError as e:
    print(f"palu-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
