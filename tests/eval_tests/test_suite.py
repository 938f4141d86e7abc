"""The side-by-side evaluation command: model specs, resume after an
interruption, and the written report."""

import json
import os

import pytest

from conftest import shared_path
from eval import suite
from eval.cli import main
from palu_jax.checkpoint import convert_checkpoint
from palu_jax.errors import ConfigError


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
  src = shared_path("models/stories260K/stories260K.bin")
  shared_path("data", "zeroshot")
  out = tmp_path_factory.mktemp("m") / "stories"
  convert_checkpoint(src, str(out))
  return str(out)


def test_model_spec_parsing(stories_dir):
  spec = suite.ModelSpec.parse(f"b={stories_dir}@kivi2")
  assert (spec.name, spec.kv, spec.kv_quant()) == ("b", "kivi2",
                                                   ("kivi", 2, 32, 128))
  assert suite.ModelSpec.parse(f"x={stories_dir}").kv_quant() is None
  for bad, field in ((stories_dir, "NAME=DIR"),
                     (f"b={stories_dir}@kivi9", "unknown KV baseline"),
                     ("b=/no/such/dir", "no such model directory"),
                     (f"a/b={stories_dir}", "model name")):
    with pytest.raises(ConfigError, match=field):
      suite.ModelSpec.parse(bad)
  with pytest.raises(ConfigError, match="unknown task"):
    suite.expand_tasks(("zeroshot", "mmlu"), None)


class Killed(BaseException):
  """Stands for the process being killed (not an Exception: nothing in the
  runner may catch it)."""


def _config():
  return suite.SuiteConfig(tasks=("zeroshot", "needle"), limit=3,
                           needle_lengths=(128, 4096), needle_samples=1,
                           batch_size=4)


def test_interrupted_run_resumes_to_identical_results(stories_dir, tmp_path,
                                                      monkeypatch):
  models = [suite.ModelSpec.parse(f"base={stories_dir}"),
            suite.ModelSpec.parse(f"kivi2={stories_dir}@kivi2")]
  whole = suite.run_suite(models, _config(), str(tmp_path / "whole"),
                          progress=False)

  real, calls, kill_at = suite.run_task, [], [4]

  def dies_on_the_fourth(task, *a, **kw):
    calls.append(task)
    if len(calls) == kill_at[0]:
      raise Killed
    return real(task, *a, **kw)
  monkeypatch.setattr(suite, "run_task", dies_on_the_fourth)
  out = str(tmp_path / "resumed")
  with pytest.raises(Killed):
    suite.run_suite(models, _config(), out, progress=False)
  calls.clear()
  kill_at[0] = None
  resumed = suite.run_suite(models, _config(), out, progress=False)
  n_tasks = 2 * len(suite.expand_tasks(("zeroshot", "needle"), None))
  assert len(calls) == n_tasks - 3          # finished parts are not redone
  strip = lambda r: {m: {t: {k: v for k, v in x.items() if k != "seconds"}
                         for t, x in ts.items()} for m, ts in r.items()}
  assert strip(resumed["results"]) == strip(whole["results"])
  assert set(resumed["results"]["base"]) == set(suite.expand_tasks(
      ("zeroshot", "needle"), None))
  needle = resumed["results"]["base"]["needle"]
  assert needle["skipped_lengths"] == [4096]     # past stories260K's 512
  # other settings invalidate a part instead of reusing it
  calls.clear()
  suite.run_suite(models[:1], suite.SuiteConfig(
      tasks=("zeroshot",), limit=2, batch_size=4), out, progress=False)
  assert len(calls) == len(suite.ZEROSHOT)


def test_cli_eval_writes_tables_and_plots(stories_dir, tmp_path, capsys):
  assert main(["eval", "--models", f"base={stories_dir}", "--tasks",
               "zeroshot", "--limit", "2", "--out", str(tmp_path),
               "--name", "s", "--no-progress"]) == 0
  out = tmp_path / "s"
  summary = json.loads((out / "results.json").read_text())
  assert summary["models"]["base"]["kv_bytes_per_token"] == 2 * 5 * 4 * 8 * 2
  row = suite.headline_rows(summary)[0]
  assert 0 <= row["zeroshot_avg"] <= 100
  md = (out / "results.md").read_text()
  assert "| base |" in md and "zeroshot_avg" in md
  pytest.importorskip("matplotlib")
  assert os.path.exists(out / "zeroshot.png")
  assert main(["eval", "--models", f"base={tmp_path}/nope"]) == 2
  assert "no such model directory" in capsys.readouterr().err
