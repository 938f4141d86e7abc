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
             {"name": "default-50-mlrd", "ppl_wikitext2": 46.9,
              "kv_bytes_per_token": 11520},
             {"name": "glrd-30-fisher-white"}]        # skipped: no ppl
  rows = {r["config"]: r for r in config_table.build_table(speed, quality)}
  # by hand: dense (21.6, 100) beats 50 % bf16 (24.1, 90) and fp8 (24.1,
  # 20) on both axes; per head (46.9, 130) is the fastest
  assert rows["dense"]["pareto"] and rows["50 %, per head, bf16"]["pareto"]
  assert not rows["50 %, head groups, bf16"]["pareto"]
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
