"""Bad input from a new user (issue 20): each gets one clean error line
(exit status 2, naming the flag, field or file) before any work, or the
correct behaviour; nothing but a palu-jax model directory is ever deleted.
Runs on the real stories260K model (../shared/models)."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from eval.cli import main
from eval.perplexity import perplexity
from eval.suite import ModelSpec, SuiteConfig, run_suite
from palu_jax.api import load_model
from palu_jax.calibrate.statistics import CalibrationConfig
from palu_jax.compress import CompressionConfig, compress_checkpoint
from palu_jax.config import ModelConfig
from palu_jax.eigen.compress import EigenConfig
from palu_jax.errors import PaluError
from palu_jax.generate import Generator
from palu_jax.sampling import SamplingConfig


@pytest.fixture(scope="module")
def stories_bin():
  return shared_path("models/stories260K/stories260K.bin")


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory, stories_bin):
  out = tmp_path_factory.mktemp("models") / "stories"
  assert main(["convert", stories_bin, str(out)]) == 0
  return str(out)


def fails(capsys, argv, *needles):
  """main(argv) exits 2 with one error line that contains every needle."""
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  for n in needles:
    assert n in err, err
  return err


# ------------------------------------------------------------ numbers, flags

@pytest.mark.parametrize("argv,flag", [
    (["ppl", "M", "--seqlen", "0"], "--seqlen"),
    (["ppl", "M", "--seqlen", "-5"], "--seqlen"),
    (["ppl", "M", "--limit", "-1"], "--limit"),
    (["ppl", "M", "--limit", "0"], "--limit"),
    (["ppl", "M", "--batch-size", "0"], "--batch-size"),
    (["eval", "--models", "a=M", "--batch-size", "0"], "--batch-size"),
    (["eval", "--models", "a=M", "--tasks", "zeroshot", "--limit", "0"],
     "--limit"),
    (["eval", "--models", "a=M", "--needle-lengths", "-5"],
     "--needle-lengths"),
    (["compress", "M", "--out", "O", "--rank-multiple", "0"],
     "--rank-multiple"),
    (["compress", "M", "--out", "O", "--quant-group", "0"], "--quant-group"),
    (["compress", "M", "--out", "O", "--ratio", "1.5"], "--ratio"),
    (["compress", "M", "--out", "O", "--calib-seqlen", "0"],
     "--calib-seqlen"),
    (["generate", "M", "--prompt", "x", "--temperature", "nan"],
     "--temperature"),
    (["generate", "M", "--prompt", "x", "--temperature", "inf"],
     "--temperature"),
    (["generate", "M", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["finetune", "M", "--out", "O", "--seqlen", "0"], "--seqlen"),
])
def test_bad_numbers_stop_at_parse_time(capsys, argv, flag):
  fails(capsys, argv, flag)


@pytest.mark.parametrize("argv,needle", [
    (["ppl", "M", "--mesh", "tensor=2"], "unknown axis 'tensor'"),
    (["generate", "M", "--prompt", "x", "--mesh", "data=two"],
     "axis 'data' needs a size >= 1"),
    (["ppl", "M", "--mesh", "data=2,data=2"], "given twice"),
])
def test_bad_mesh_flags_name_the_axis(capsys, argv, needle):
  fails(capsys, argv, "--mesh", needle)


def test_process_flags_without_a_coordinator(capsys, monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
            "OMPI_COMM_WORLD_SIZE", "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(k, raising=False)
  fails(capsys, ["--process-id", "1", "ppl", "M"],
        "need a coordinator address")
  fails(capsys, ["--coordinator", "host", "--num-processes", "2",
                 "--process-id", "0", "ppl", "M"], "is not host:port")


def test_mesh_larger_than_the_machine_is_one_line(capsys, tmp_path):
  """The device count is checked when the mesh is built (this process has
  one CPU device)."""
  err = fails(capsys, ["ppl", "smollm2-135m", "--mesh",
                              "data=2,model=4", "--data-dir",
                              str(tmp_path)])
  assert "has 8 devices, but 1 are available" in err


def test_version_and_help_show_defaults(capsys):
  assert main(["--version"]) == 0
  assert capsys.readouterr().out.startswith("palu-jax ")
  assert main(["compress", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "separate key and value latents [Palu's choice]" in text
  assert "(default: True)" not in text
  for cmd in ("generate", "ppl", "eval", "finetune", "convert", "demo"):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default:" in out or cmd == "convert", cmd


def test_flags_that_would_be_ignored(capsys, stories_bin, tmp_path):
  fails(capsys, ["compress", stories_bin, "--out", str(tmp_path / "o"),
                 "--group-size", "2"], "group_size", "--mode glrd")
  fails(capsys, ["compress", stories_bin, "--out", str(tmp_path / "o"),
                 "--hadamard"], "hadamard", "--kv-bits")
  missing = str(tmp_path / "no-data")
  fails(capsys, ["compress", stories_bin, "--out", str(tmp_path / "o"),
                 "--data-dir", missing], missing)
  fails(capsys, ["ppl", stories_bin, "--data-dir", missing], missing)
  assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------- outputs never destroy

def test_overwrite_never_deletes_what_is_not_a_model(capsys, stories_bin,
                                                     stories_dir, tmp_path,
                                                     monkeypatch):
  keep = tmp_path / "work"
  keep.mkdir()
  (keep / "notes.txt").write_text("mine")
  # the current directory
  monkeypatch.chdir(keep)
  fails(capsys, ["convert", stories_bin, ".", "--overwrite"],
        "current directory")
  monkeypatch.chdir(tmp_path)
  # a directory without the marker
  fails(capsys, ["convert", stories_bin, str(keep), "--overwrite"],
        "not a palu-jax model directory")
  # the source itself, or a folder holding it
  fails(capsys, ["convert", stories_dir, stories_dir, "--overwrite"],
        "is the source")
  fails(capsys, ["compress", stories_dir, "--out",
                 os.path.dirname(stories_dir), "--overwrite"], "is the source")
  assert (keep / "notes.txt").read_text() == "mine"
  assert os.path.isfile(os.path.join(stories_dir, "palu_jax.json"))
  # demo on an existing non-model directory refuses instead of wiping it
  fails(capsys, ["demo", "--out", str(keep)], "already exists")
  assert (keep / "notes.txt").read_text() == "mine"
  # a model directory is replaced when asked
  out = tmp_path / "model"
  assert main(["convert", stories_bin, str(out)]) == 0
  fails(capsys, ["convert", stories_bin, str(out)], "already exists")
  assert main(["convert", stories_bin, str(out), "--overwrite"]) == 0


def test_unwritable_outputs_fail_first(capsys, stories_bin, stories_dir,
                                       tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("x")
  for argv in (["convert", stories_bin, str(blocker / "out")],
               ["compress", stories_bin, "--out", str(blocker / "out"),
                "--calib-cache", str(tmp_path / "cache")],
               ["finetune", stories_dir, "--out", str(blocker / "out")]):
    fails(capsys, argv, "not a writable directory")
  # ppl checks --out before evaluating, not after
  fails(capsys, ["ppl", stories_dir, "--dataset", "tinystories", "--out",
                 str(blocker / "res")], "not a writable directory")
  assert not os.path.exists(tmp_path / "cache")   # no calibration ran


def test_compress_checks_everything_before_calibrating(capsys, stories_bin,
                                                       tmp_path):
  taken = tmp_path / "taken"
  taken.mkdir()
  cache = tmp_path / "cache"
  fails(capsys, ["compress", stories_bin, "--out", str(taken),
                 "--calib-cache", str(cache)], "already exists")
  fails(capsys, ["compress", stories_bin, "--out", str(tmp_path / "o"),
                 "--calib-seqlen", "100000", "--calib-cache", str(cache)],
        "calibration.seqlen", "context")
  fails(capsys, ["compress", stories_bin, "--out", str(tmp_path / "o"),
                 "--method", "eigen", "--floor", "2",
                 "--calib-cache", str(cache)], "floor")
  assert not cache.exists()


def test_stale_temporaries_are_cleaned(capsys, stories_bin, tmp_path):
  stale = tmp_path / ".model.tmp-crashed"
  stale.mkdir()
  (stale / "config.json").write_text("{}")
  fails(capsys, ["ppl", str(stale)], "interrupted palu-jax write")
  assert main(["convert", stories_bin, str(tmp_path / "model")]) == 0
  assert not stale.exists()
  assert sorted(os.listdir(tmp_path)) == ["model"]


# ------------------------------------------------------------ files and data

def test_bad_checkpoint_files_are_named(capsys, tmp_path):
  empty_bin = tmp_path / "empty.bin"
  empty_bin.write_bytes(b"")
  err = fails(capsys, ["convert", str(empty_bin), str(tmp_path / "o")],
              "empty.bin", "not a llama2.c checkpoint")
  assert "pickled" not in err
  random_bin = tmp_path / "random.bin"
  random_bin.write_bytes(np.random.default_rng(0).bytes(4096))
  fails(capsys, ["convert", str(random_bin), str(tmp_path / "o")],
        "random.bin", "not a llama2.c checkpoint")
  zipped = tmp_path / "pytorch_model.bin"
  zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
  fails(capsys, ["convert", str(zipped), str(tmp_path / "o")], "pickled")
  st = tmp_path / "st" / "x.safetensors"
  st.parent.mkdir()
  st.write_bytes(b"")
  fails(capsys, ["convert", str(st), str(tmp_path / "o")], "x.safetensors",
        "not a safetensors file")


@pytest.mark.parametrize("config,field", [
    ([1, 2], "must hold a JSON object"),
    ({"model_type": "llama", "num_attention_heads": 0, "hidden_size": 64},
     "num_attention_heads"),
])
def test_bad_hf_config_is_named(capsys, tmp_path, config, field):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(config))
  fails(capsys, ["convert", str(d), str(tmp_path / "o")], "config.json",
        field)


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "a"}\n{"text": \n', "line 2 is not JSON"),
    (b'[1, 2]\n', "line 1 is a JSON list"),
    (b'\xff\xfe\x00\x81' * 64, "not UTF-8"),
])
def test_malformed_jsonl_is_named(capsys, stories_dir, tmp_path, content,
                                  needle):
  path = tmp_path / "data.jsonl"
  path.write_bytes(content)
  fails(capsys, ["ppl", stories_dir, "--dataset", str(path)], "data.jsonl",
        needle)


# ------------------------------------------------------------------- the API

def test_api_type_errors(stories_dir, tmp_path):
  with pytest.raises(PaluError, match="model must be a path"):
    load_model(None)
  with pytest.raises(PaluError, match="ratio: must be a finite number"):
    CompressionConfig(ratio="0.5")
  with pytest.raises(PaluError, match="temperature"):
    SamplingConfig(temperature=float("nan"))
  with pytest.raises(PaluError, match="calibration.seqlen"):
    CalibrationConfig(seqlen="512")
  with pytest.raises(PaluError, match="comp: must be a CompressionConfig"):
    compress_checkpoint(stories_dir, str(tmp_path / "o"), {"ratio": 0.5})
  with pytest.raises(PaluError, match="limit"):
    SuiteConfig(limit=0)


def test_generation_input_is_checked(stories_dir):
  model, tok = load_model(stories_dir, dtype="float32")
  gen = Generator(model)
  with pytest.raises(PaluError, match="wrap it"):
    gen.generate_ids([1, 2, 3], max_new_tokens=2)
  with pytest.raises(PaluError, match="encode text"):
    gen.generate_ids("Once upon", max_new_tokens=2)
  with pytest.raises(PaluError, match="must be a list of token ids"):
    gen.generate_ids(["Once upon"], max_new_tokens=2)
  vocab = model.cfg.vocab_size
  with pytest.raises(PaluError, match=f"token id {vocab} is outside"):
    gen.generate_ids([[1, vocab]], max_new_tokens=2)
  with pytest.raises(PaluError, match="batch"):
    model.init_cache(0, 64)
  with pytest.raises(PaluError, match="past the model's context"):
    model(jnp.zeros((1, model.cfg.max_seq_len + 1), jnp.int32))


def test_nan_weights_do_not_print_nan(stories_dir):
  model, tok = load_model(stories_dir, dtype="float32")
  w = model.layers[0].mlp.up_proj.kernel
  w[...] = w[...].at[0, 0].set(jnp.nan)
  ids = np.arange(1, 200) % 100
  with pytest.raises(PaluError, match="not finite"):
    perplexity(model, ids, seqlen=64, progress=False)


def test_eigen_defaults_fit_a_small_head_dim():
  """stories260K has head_dim 8: the rank unit follows it down (to half
  the head dim, so 50 % stays reachable)."""
  cfg = ModelConfig(vocab_size=512, dim=64, n_layers=5, n_heads=8,
                    n_kv_heads=4, head_dim=8, hidden_dim=172)
  econf = EigenConfig(ratio=0.5).resolved(cfg)
  assert econf.multiple == 4
  econf.validate(cfg)
  assert EigenConfig(ratio=0.5, multiple=4).resolved(cfg).multiple == 4


def test_eval_leaves_no_empty_folder(stories_dir, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(stories_dir, bare)
  for name in os.listdir(bare):
    if name.startswith("tokenizer"):
      os.remove(bare / name)
  out = tmp_path / "results" / "suite"
  with pytest.raises(PaluError, match="tokenizer"):
    run_suite([ModelSpec.parse(f"a={bare}")], SuiteConfig(tasks=("ppl",)),
              str(out), progress=False)
  assert not out.exists()


def test_finetune_seqlen_past_the_context(capsys, stories_dir, tmp_path):
  fails(capsys, ["finetune", stories_dir, "--out", str(tmp_path / "ft"),
                 "--seqlen", "100000", "--steps", "1", "--warmup", "0"], "seqlen", "context")
  assert not (tmp_path / "ft").exists()


def test_eigen_with_defaults_on_stories260k(capsys, stories_bin, tmp_path):
  """`compress --method eigen --ratio 0.5` failed on head_dim 8 ("multiple:
  must be in 1..head_dim=8, got 16"); the rank unit now follows it."""
  out = tmp_path / "eigen"
  assert main(["compress", stories_bin, "--out", str(out), "--method",
               "eigen", "--ratio", "0.5", "--calib-dataset", "tinystories",
               "--calib-windows", "4", "--calib-seqlen", "64",
               "--no-calib-cache"]) == 0, capsys.readouterr().err
  marker = json.loads((out / "palu_jax.json").read_text())
  assert marker["compression"]["multiple"] == 4
  assert "50.0% of the dense" in capsys.readouterr().out
