"""eval/bench_e2e.py: variant names and the Palu configs they build."""

import pytest

from eval.bench_decode import SHAPES
from eval.bench_e2e import palu_config, variant_spec


def test_variant_names_and_configs():
  cfg = SHAPES["llama2-7b"]
  assert variant_spec("base") is None and variant_spec("base_xla") is None
  assert variant_spec("palu50_fp8_g1") == (0.5, 8, 1, False)
  assert variant_spec("palu30_int4") == (0.3, 4, 4, False)
  assert variant_spec("palu50_shared") == (0.5, 16, 1024, True)
  with pytest.raises(SystemExit, match="palux"):
    variant_spec("palux")
  # Llama-2-7B, groups of 4 KV heads of 128 at 50 %: rank 256 per group
  # float8: one scale per token and latent group, as the library's default
  p = palu_config(cfg, *variant_spec("palu50_fp8"))
  assert (p.group_size, p.k_ranks[0][0], p.kv_bits, p.quant_group) == (
      4, 256, 8, 256)
  # and an e4m3 B_k: the Mosaic GPU kernel's fp8 rebuild takes no other
  assert p.k_up_bits == 8
  assert palu_config(cfg, *variant_spec("palu50_int4")).quant_group == 32
  assert palu_config(cfg, *variant_spec("palu50_int4")).k_up_bits == 16
  p = palu_config(cfg, *variant_spec("palu50_int4"), scale_per_token=True)
  assert p.quant_group == 256
  assert len(p.k_ranks) == cfg.n_layers
  assert len(p.k_ranks[0]) == cfg.n_kv_heads // 4


def test_layers_override_runs_both_models_with_that_many(tmp_path,
                                                         monkeypatch):
  """`--layers N`: the tiny shape decoded on the CPU with one layer instead
  of two, for the dense and a Palu model alike; the rows and the table say
  so (the bandwidth probe, a GPU number, is skipped)."""
  import json

  from eval import bench_e2e
  from eval.bench_e2e import main
  monkeypatch.setattr(bench_e2e, "measure_bandwidth",
                      lambda: {"reference": 1e9})
  assert main(["--model", "tiny", "--variants", "base", "palu50",
               "--batches", "1", "--contexts", "64", "--layers", "1",
               "--steps", "8", "--repeats", "1", "--out", str(tmp_path),
               "--name", "e2e"]) == 0
  rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
  assert [(r["variant"], r["layers"]) for r in rows] == [("base", 1),
                                                          ("palu50", 1)]
  assert all(r["tokens_per_s"] > 0 for r in rows)
  assert "1 decoder layers" in (tmp_path / "e2e.md").read_text()
  with pytest.raises(SystemExit, match="--layers 0"):
    main(["--model", "tiny", "--layers", "0", "--out", str(tmp_path)])
