"""eval/replace_bench_rows.py: some variants' rows of a results file
replaced by a later call's, every other row kept as it was."""

import json
import os

import pytest

from eval import replace_bench_rows as rb


def _row(variant, context, us, speedup, batch=1, shape="llama2-7b"):
  return {"device": "NVIDIA H200", "shape": shape, "batch": batch,
          "context": context, "variant": variant, "us": us,
          "speedup": speedup}


def _write(path, rows):
  with open(path, "w") as f:
    json.dump(rows, f)


def test_named_variants_are_replaced_in_place_and_the_rest_kept(tmp_path):
  rows = [_row("full_cudnn", 65536, 240.0, 1.0),
          _row("palu50_rope_fp8", 65536, 434.5, 0.55),
          _row("palu50_norope_fp8", 65536, 86.0, 2.80),
          _row("palu50_rope", 65536, 303.4, 0.79)]
  later = [_row("full_cudnn", 65536, 239.8, 1.0),          # not named: unused
           _row("palu50_rope_fp8", 65536, 361.5, 0.66),
           _row("palu50_norope_fp8", 65536, 76.7, 3.13),
           _row("palu50_rope_fp8", 131072, 701.5, 0.68)]   # new cell: added
  results, newer = tmp_path / "bench.json", tmp_path / "later.json"
  _write(results, rows)
  _write(newer, later)
  assert rb.main([str(results), str(newer), "--variants", "palu50_rope_fp8",
                  "palu50_norope_fp8", "--note", "fp8 rows re-timed."]) == 0
  got = json.loads(results.read_text())
  assert got == [rows[0], later[1], later[2], rows[3], later[3]]
  md = (tmp_path / "bench.md").read_text()
  assert "fp8 rows re-timed." in md and "| 361.5 |" in md
  assert "| 434.5 |" not in md


def test_a_variant_the_later_call_lacks_is_refused_and_nothing_written(
    tmp_path):
  rows = [_row("palu50_rope_fp8", 65536, 434.5, 0.55)]
  results, newer = tmp_path / "bench.json", tmp_path / "later.json"
  _write(results, rows)
  _write(newer, [_row("palu50_rope_fp8", 65536, 361.5, 0.66)])
  before = results.read_text()
  with pytest.raises(SystemExit, match=r"later.json: .*palu50_norope_fp8"):
    rb.main([str(results), str(newer), "--variants", "palu50_rope_fp8",
             "palu50_norope_fp8"])
  assert results.read_text() == before
  assert not os.path.exists(tmp_path / "bench.md")


def test_missing_or_malformed_files_name_the_file(tmp_path):
  newer = tmp_path / "later.json"
  _write(newer, {"rows": []})
  with pytest.raises(SystemExit, match="nope.json: no such results file"):
    rb.main([str(tmp_path / "nope.json"), str(newer), "--variants", "x"])
  results = tmp_path / "bench.json"
  _write(results, [])
  with pytest.raises(SystemExit, match="later.json: expected a list"):
    rb.main([str(results), str(newer), "--variants", "x"])
