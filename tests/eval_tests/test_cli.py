"""The palu-jax command line on the real stories260K model."""

import json
import os

import pytest

from conftest import shared_path
from eval.cli import main
from palu_jax.api import load_model
from palu_jax.generate import Generator


@pytest.fixture(scope="module")
def stories_bin():
  return shared_path("models/stories260K/stories260K.bin")


def test_convert_then_ppl_and_generate(tmp_path, stories_bin, capsys):
  out = tmp_path / "stories"
  assert main(["convert", stories_bin, str(out)]) == 0
  assert os.path.exists(out / "palu_jax.json")
  assert os.path.exists(out / "tokenizer.bin")
  assert main(["ppl", str(out), "--dataset", "tinystories", "--seqlen", "256",
               "--limit", "3", "--batch-size", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1].startswith("perplexity: ")
  assert 1.0 < float(lines[-1].split()[1]) < 20.0
  assert main(["generate", str(out), "--prompt", "Once upon a time",
               "--max-new-tokens", "24"]) == 0
  printed = capsys.readouterr().out
  model, tok = load_model(str(out), dtype="bfloat16")
  ids = tok.encode("Once upon a time")
  gen = Generator(model).generate_ids([ids], max_new_tokens=24)[0]
  assert printed.rstrip("\n") == tok.decode(ids + gen)


def test_cli_reports_errors(tmp_path, capsys):
  assert main(["ppl", str(tmp_path / "missing.gguf")]) == 2
  err = capsys.readouterr().err
  assert "palu-jax: error:" in err and "missing.gguf" in err


def test_cli_unknown_dataset(stories_bin, capsys):
  assert main(["ppl", stories_bin, "--dataset", "no_such_corpus"]) == 2
  assert "unknown dataset" in capsys.readouterr().err


def test_compress_then_ppl_and_generate(tmp_path, stories_bin, capsys):
  out = tmp_path / "palu"
  assert main(["compress", stories_bin, "--out", str(out), "--ratio", "0.5",
               "--rank-multiple", "4", "--calib-dataset", "tinystories",
               "--calib-windows", "4", "--calib-seqlen", "64",
               "--calib-cache", str(tmp_path / "cache")]) == 0
  printed = capsys.readouterr().out
  assert "KV cache: 320 B/token, 50.0% of the dense 640 B/token" in printed
  assert main(["ppl", str(out), "--dataset", "tinystories", "--seqlen", "256",
               "--limit", "2"]) == 0
  ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
  assert 1.0 < ppl < 40.0
  assert main(["generate", str(out), "--prompt", "Once upon a time",
               "--max-new-tokens", "12"]) == 0
  model, tok = load_model(str(out), dtype="bfloat16")
  ids = tok.encode("Once upon a time")
  gen = Generator(model).generate_ids([ids], max_new_tokens=12)[0]
  assert capsys.readouterr().out.rstrip("\n") == tok.decode(ids + gen)
  # The faithful Palu preset with bad input names the field.
  assert main(["compress", stories_bin, "--out", str(tmp_path / "x"),
               "--palu", "--mode", "glrd", "--group-size", "3"]) == 2
  assert "group_size" in capsys.readouterr().err


def test_compress_flags_map_to_the_config():
  """The issue's spelling `--whiten` (bare) means Palu's input whitening."""
  from eval.cli import build_parser
  args = build_parser().parse_args(
      ["compress", "m", "--out", "o", "--ratio", "0.5", "--mode", "glrd",
       "--group-size", "4", "--alloc", "fisher", "--whiten"])
  assert (args.whiten, args.mode, args.group_size, args.alloc) == (
      "input", "glrd", 4, "fisher")
  assert build_parser().parse_args(
      ["compress", "m", "--out", "o", "--no-whiten"]).whiten == "none"
  assert build_parser().parse_args(
      ["compress", "m", "--out", "o", "--separate-kv"]).shared_kv is False


def test_compress_eigen_then_ppl(tmp_path, stories_bin, capsys):
  """--method eigen: the budget mode's bytes, a loadable model, and flags
  of the other method refused by name."""
  out = tmp_path / "eigen"
  common = ["--calib-dataset", "tinystories", "--calib-windows", "4",
            "--calib-seqlen", "64", "--calib-cache", str(tmp_path / "cache")]
  assert main(["compress", stories_bin, "--out", str(out), "--method",
               "eigen", "--ratio", "0.25", "--rank-multiple", "2",
               "--floor", "0.25", *common]) == 0
  printed = capsys.readouterr().out
  assert "KV cache: 480 B/token, 75.0% of the dense 640 B/token" in printed
  with open(out / "ranks.md") as f:
    assert f.read().startswith("Eigen Attention, ε = ")
  with open(out / "palu_jax.json") as f:
    marker = json.load(f)
  assert marker["compression"]["method"] == "eigen"
  assert marker["palu"]["group_size"] == 1
  assert main(["ppl", str(out), "--dataset", "tinystories", "--seqlen", "128",
               "--limit", "2"]) == 0
  ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
  assert 1.0 < ppl < 40.0
  assert main(["compress", stories_bin, "--out", str(tmp_path / "x"),
               "--method", "eigen", "--mode", "jlrd", *common]) == 2
  assert "--mode does not apply to --method eigen" in capsys.readouterr().err
  assert main(["compress", stories_bin, "--out", str(tmp_path / "y"),
               "--eps", "0.1", *common]) == 2
  assert "--eps does not apply to --method palu" in capsys.readouterr().err


def test_compress_fp8_latents(tmp_path, stories_bin, capsys):
  """--kv-bits 8: float8 latents, 1 byte each + a bf16 scale per group of
  16 (stories260K at 50 %: 160 latents -> 160 + 2·10 = 180 B/token), at
  nearly the 16-bit model's perplexity (measured: 4.4701 vs 4.4682)."""
  common = ["--ratio", "0.5", "--rank-multiple", "4", "--calib-dataset",
            "tinystories", "--calib-windows", "8", "--calib-seqlen", "128",
            "--no-calib-cache"]
  ppl = {}
  for bits, group in (("8", "16"), ("8", "group"), ("16", "16")):
    name = bits + ("g" if group == "group" else "")
    out = tmp_path / f"b{name}"
    assert main(["compress", stories_bin, "--out", str(out), "--kv-bits",
                 bits, "--quant-group", group, *common]) == 0
    printed = capsys.readouterr().out
    if name == "8":
      assert "KV cache: 180 B/token" in printed
    if name == "8g":    # one scale per token and latent group
      with open(out / "palu_jax.json") as f:
        assert json.load(f)["palu"]["quant_group"] == 0
    assert main(["ppl", str(out), "--dataset", "tinystories", "--seqlen",
                 "256", "--limit", "8"]) == 0
    ppl[name] = float(capsys.readouterr().out.strip().splitlines()[-1]
                      .split()[1])
  assert ppl["8"] != ppl["16"]                      # rounding really applied
  assert abs(ppl["8"] / ppl["16"] - 1) < 0.01
  assert abs(ppl["8g"] / ppl["16"] - 1) < 0.01


def test_compress_fp8_key_up_projection(tmp_path, stories_bin, capsys):
  """--k-up-bits 8: each layer's B_k is stored as e4m3 values times a power
  of two per (latent group, column); the marker records k_up_bits=8."""
  import jax.numpy as jnp
  import numpy as np
  from palu_jax.api import load_params
  out = tmp_path / "kup8"
  assert main(["compress", stories_bin, "--out", str(out), "--ratio", "0.5",
               "--rank-multiple", "4", "--k-up-bits", "8", "--calib-dataset",
               "tinystories", "--calib-windows", "8", "--calib-seqlen", "128",
               "--no-calib-cache"]) == 0
  cfg, params, palu, _ = load_params(str(out))
  assert palu.k_up_bits == 8
  for i, ranks in enumerate(palu.k_ranks):
    w = np.asarray(params[f"layers.{i}.attn.k_up"], np.float32)
    start = 0
    for r in ranks:
      block = w[start:start + r]
      start += r
      # the column's scale: the power of two with max|col| / scale in
      # (224, 448]; every entry / scale must then be an e4m3 value
      amax = np.abs(block).max(0)
      scale = 2.0 ** np.ceil(np.log2(np.where(amax > 0, amax, 1) / 448))
      x = block / scale
      back = np.asarray(jnp.asarray(x).astype(jnp.float8_e4m3fn)
                        .astype(jnp.float32))
      np.testing.assert_array_equal(back, x)
  assert main(["ppl", str(out), "--dataset", "tinystories", "--seqlen",
               "256", "--limit", "4"]) == 0
  ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
  assert 1.0 < ppl < 6.0


def test_compress_presets_map_to_the_config():
  """--preset sets the fields of palu_jax.compression_presets.PRESETS over
  the defaults; explicit flags override it; Eigen refuses it by name."""
  from eval.cli import build_parser, compression_config
  from palu_jax.compress import CompressionConfig
  from palu_jax.compression_presets import PRESETS
  from palu_jax.errors import ConfigError
  parse = lambda *a: build_parser().parse_args(["compress", "m", "--out",
                                                "o", *a])
  for name, preset in PRESETS.items():
    comp = compression_config(parse("--preset", name))
    assert comp == CompressionConfig(**preset.fields), name
  small = compression_config(parse("--preset", "small", "--kv-bits", "4",
                                   "--hadamard"))
  assert (small.kv_bits, small.hadamard, small.multiple) == (4, True, 32)
  assert compression_config(parse("--preset", "fast", "--ratio",
                                  "0.3")).ratio == 0.3
  with pytest.raises(ConfigError, match="preset"):
    compression_config(parse("--preset", "small", "--method", "eigen"))
  with pytest.raises(SystemExit):
    parse("--preset", "tiny")


def test_compress_with_a_preset(tmp_path, stories_bin, capsys):
  """A preset compresses the real model and lands in the marker file
  (stories260K's 8-wide heads need smaller rank multiples than the preset's
  32: the flags override it)."""
  out = tmp_path / "small"
  assert main(["compress", stories_bin, "--out", str(out), "--preset",
               "small", "--rank-multiple", "8", "--quant-group", "8",
               "--calib-dataset", "tinystories", "--calib-windows", "4",
               "--calib-seqlen", "64", "--no-calib-cache"]) == 0
  with open(out / "palu_jax.json") as f:
    marker = json.load(f)
  assert marker["compression"]["kv_bits"] == 8
  assert marker["compression"]["ratio"] == 0.5
  assert marker["compression"]["multiple"] == 8
  assert "KV cache: " in capsys.readouterr().out
