"""What a compression leaves in the cache: bytes per token and the ranks
chosen per layer (shared by every method: Palu, Eigen Attention)."""

from __future__ import annotations

from palu_jax.calibrate.statistics import CalibrationStats
from palu_jax.config import ModelConfig, PaluConfig


def kv_bytes_per_token(cfg: ModelConfig, palu: PaluConfig | None,
                       bytes_per_value: int = 2) -> int:
  """Cache bytes per token over all layers: 16-bit entries, or codes (packed
  integers or fp8) plus each quantization group's 16-bit scale (and offset,
  for integer codes)."""
  if palu is None:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_value
  if palu.kv_bits == 16:
    return palu.kv_latents_per_token() * bytes_per_value
  from palu_jax.quantize import latent_codes
  widths = [(sum(r), palu.layer_quant_group(i))
            for i, r in enumerate(palu.k_ranks)]
  if not palu.shared_kv:
    widths += [(sum(r), palu.layer_quant_group(i))
               for i, r in enumerate(palu.v_ranks)]
  return sum(latent_codes.bytes_per_token(w, palu.kv_bits, group,
                                          scale_bytes=bytes_per_value)
             for w, group in widths)


def rank_report(cfg: ModelConfig, palu: PaluConfig,
                stats: CalibrationStats | None) -> dict:
  """Chosen ranks per layer and module, with totals and cache sizes."""
  layers = []
  for i in range(cfg.n_layers):
    row = {"layer": i, "k_ranks": list(palu.k_ranks[i]),
           "v_ranks": list(palu.v_ranks[i])}
    if stats is not None and stats.fisher:
      row["fisher_k"] = stats.fisher.get(f"layers.{i}.attn.k_proj")
      row["fisher_v"] = stats.fisher.get(f"layers.{i}.attn.v_proj")
    layers.append(row)
  full = kv_bytes_per_token(cfg, None)
  ours = kv_bytes_per_token(cfg, palu)
  return {"layers": layers, "kv_bytes_per_token": ours,
          "dense_kv_bytes_per_token": full, "kept_fraction": ours / full,
          "k_latents": sum(map(sum, palu.k_ranks)),
          "v_latents": sum(map(sum, palu.v_ranks))}


def format_rank_report(report: dict) -> str:
  """A markdown table of the ranks per layer."""
  lines = ["| layer | k ranks | v ranks | Fisher k | Fisher v |",
           "|---:|---|---|---:|---:|"]
  for r in report["layers"]:
    fk, fv = r.get("fisher_k"), r.get("fisher_v")
    lines.append(f"| {r['layer']} | {r['k_ranks']} | {r['v_ranks']} | "
                 f"{'' if fk is None else f'{fk:.3g}'} | "
                 f"{'' if fv is None else f'{fv:.3g}'} |")
  lines.append(f"\nKV cache: {report['kv_bytes_per_token']} B/token "
               f"(dense {report['dense_kv_bytes_per_token']} B/token, kept "
               f"{report['kept_fraction']:.1%}; k latents "
               f"{report['k_latents']}, v latents {report['v_latents']})")
  return "\n".join(lines)
