"""eval/config_table.py: the join of quality and speed rows and the front."""

import json

from eval import config_table


def _speed(variant, tps, batch=1, context=65536):
  return {"variant": variant, "batch": batch, "context": context,
          "tokens_per_s": tps, "speedup": tps / 100.0}


def test_join_and_front():
  speed = [_speed("base", 100.0), _speed("palu50", 90.0),
           _speed("palu50_g1", 130.0), _speed("palu50_fp8", 20.0),
           _speed("palu50_g2", 110.0),
           _speed("palu50", 999.0, context=4096)]     # other point: ignored
  quality = [{"name": "base", "ppl_wikitext2": 21.6, "ppl_c4": 37.0,
              "kv_bytes_per_token": 23040},
             {"name": "default-50-bf16", "ppl_wikitext2": 24.1,
              "kv_bytes_per_token": 11520},
             {"name": "default-50-fp8", "ppl_wikitext2": 24.1,
              "kv_bytes_per_token": 6120},
             {"name": "default-50-fp8-kup8", "ppl_wikitext2": 24.4,
              "kv_bytes_per_token": 6120},
             {"name": "default-50-mlrd", "ppl_wikitext2": 46.9,
              "kv_bytes_per_token": 11520},
             {"name": "glrd-30-fisher-white"}]        # skipped: no ppl
  rows = {r["config"]: r for r in config_table.build_table(speed, quality)}
  # by hand: dense (21.6, 100) beats 50 % bf16 (24.1, 90) and fp8 with an
  # e4m3 B_k (24.4, 20) on both axes; per head (46.9, 130) is the fastest
  assert rows["dense"]["pareto"] and rows["50 %, per head, bf16"]["pareto"]
  assert not rows["50 %, head groups, bf16"]["pareto"]
  # the float8 speed row (its kernel rebuilds keys with an e4m3 B_k) goes
  # with the e4m3-B_k quality row; fp8 with a 16-bit B_k has no speed
  e4m3 = rows["50 %, head groups, fp8 + e4m3 B_k"]
  assert (e4m3["tokens_per_s"], e4m3["ppl_wikitext2"]) == (20.0, 24.4)
  assert not e4m3["pareto"] and e4m3["preset"] == "small"
  assert rows["50 %, head groups, fp8"]["tokens_per_s"] is None
  assert not rows["50 %, head groups, fp8"]["pareto"]
  # speed without a quality row: listed, never on the front
  g2 = rows["50 %, 2 heads per latent, bf16"]
  assert g2["tokens_per_s"] == 110.0 and g2["ppl_wikitext2"] is None
  assert not g2["pareto"]
  assert rows["50 %, head groups, bf16"]["tokens_per_s"] == 90.0
  assert rows["50 %, head groups, fp8"]["smollm2_kv_bytes_per_token"] == 6120
  assert "30 %, head groups, bf16" not in rows        # neither measurement


def test_writes_files(tmp_path):
  speed = tmp_path / "speed.json"
  speed.write_text(json.dumps({"rows": [_speed("base", 100.0),
                                        _speed("palu50_g1", 120.0)]}))
  quality = tmp_path / "q.json"
  quality.write_text(json.dumps({"rows": [
      {"name": "base", "ppl_wikitext2": 21.6},
      {"name": "default-50-mlrd", "ppl_wikitext2": 46.9}]}))
  assert config_table.main(["--speed", str(speed), "--quality", str(quality),
                            "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "config_table.json").read_text())["rows"]
  assert [r["pareto"] for r in rows] == [True, True]
  assert "| dense |" in (tmp_path / "config_table.md").read_text()
