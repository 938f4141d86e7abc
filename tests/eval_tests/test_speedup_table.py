"""eval/speedup_table.py: the README's kernel table from a results file."""

import json

import pytest

from eval.speedup_table import main, speedup_table


def _row(variant, speedup, shape="llama2-7b", batch=1, context=65536):
  return {"variant": variant, "speedup": speedup, "shape": shape,
          "batch": batch, "context": context, "us": 1.0}


def test_columns_in_readme_order_and_blank_where_missing():
  rows = [_row("full_cudnn", 1.0), _row("palu50_norope", 1.834),
          _row("palu50_rope", 0.8072), _row("palu50_rope_g1", 1.676),
          _row("palu50_rope", 0.73, shape="llama3-8b", batch=8,
               context=131072)]
  table = speedup_table(rows).splitlines()
  assert table[0] == ("| shape | batch | context | RoPE G-LRD-4 | RoPE M-LRD "
                      "| no RoPE G-LRD-4 |")
  assert table[2] == "| llama2-7b | 1 | 64K | 0.81 | 1.68 | 1.83 |"
  assert table[3] == "| llama3-8b | 8 | 128K | 0.73 |  |  |"
  assert len(table) == 4               # the baseline is no column


def test_no_latent_rows_is_an_error():
  with pytest.raises(ValueError, match="no latent-attention rows"):
    speedup_table([_row("full_cudnn", 1.0)])


def test_cli_reads_a_results_file(tmp_path, capsys):
  path = tmp_path / "r.json"
  path.write_text(json.dumps([_row("palu50_norope_g2", 1.9)]))
  assert main([str(path)]) == 0
  assert "| llama2-7b | 1 | 64K | 1.90 |" in capsys.readouterr().out
  assert main([str(tmp_path / "missing.json")]) == 2
  assert "no results file" in capsys.readouterr().err
