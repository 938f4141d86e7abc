"""An independent NumPy (float64) Llama forward pass for tests.

It reads weights in *source* layouts (HF names, [out, in] matrices), with its
own RoPE (rotate-half for HF layout, interleaved pairs for Meta/GGUF/llama2.c
layout) and its own llama3 frequency scaling, so it shares no code with
palu_jax or convert.
"""

from __future__ import annotations

import math

import numpy as np


def random_hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random HF-named weights ([out, in]) for a config dict (HF keys)."""
  rng = np.random.default_rng(seed)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h = cfg.get("head_dim") or d // n
  def mat(o, i):
    return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)
  w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
       "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
  if not cfg.get("tie_word_embeddings", False):
    w["lm_head.weight"] = mat(v, d)
  bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    w[p + "self_attn.q_proj.weight"] = mat(n * h, d)
    w[p + "self_attn.k_proj.weight"] = mat(k * h, d)
    w[p + "self_attn.v_proj.weight"] = mat(k * h, d)
    w[p + "self_attn.o_proj.weight"] = mat(d, n * h)
    if bias:
      for name, size in (("q", n * h), ("k", k * h), ("v", k * h)):
        w[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(size)).astype(np.float32)
    w[p + "mlp.gate_proj.weight"] = mat(f, d)
    w[p + "mlp.up_proj.weight"] = mat(f, d)
    w[p + "mlp.down_proj.weight"] = mat(d, f)
  return w


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
  freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if not scaling:
    return freq
  # Llama 3.1 reference formula (Meta's `apply_scaling`), per frequency.
  out = []
  old = scaling["original_max_position_embeddings"]
  lo, hi, factor = (scaling["low_freq_factor"], scaling["high_freq_factor"],
                    scaling["factor"])
  for fr in freq:
    wavelen = 2 * math.pi / fr
    if wavelen < old / hi:
      out.append(fr)
    elif wavelen > old / lo:
      out.append(fr / factor)
    else:
      s = (old / wavelen - lo) / (hi - lo)
      out.append((1 - s) * fr / factor + s * fr)
  return np.asarray(out)


def _rope(x: np.ndarray, pos: np.ndarray, freq: np.ndarray, interleaved: bool):
  """x [T, heads, H] at positions pos [T]."""
  ang = pos[:, None] * freq[None, :]                       # [T, H/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  if interleaved:
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out
  half = x.shape[-1] // 2
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(w: dict[str, np.ndarray], cfg: dict, tokens, *,
            interleaved_rope: bool = False) -> np.ndarray:
  """Logits [T, V] (float64) of one sequence; cfg uses HF config keys."""
  tokens = np.asarray(tokens)
  t = len(tokens)
  d = cfg["hidden_size"]
  n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h = cfg.get("head_dim") or d // n
  eps = cfg.get("rms_norm_eps", 1e-5)
  freq = inv_freq(h, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
  pos = np.arange(t, dtype=np.float64)
  w = {kk: np.asarray(vv, np.float64) for kk, vv in w.items()}
  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  def lin(x, name):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y
  x = w["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    xn = rms(x, w[p + "input_layernorm.weight"])
    q = _rope(lin(xn, p + "self_attn.q_proj").reshape(t, n, h), pos, freq,
              interleaved_rope)
    kk = _rope(lin(xn, p + "self_attn.k_proj").reshape(t, k, h), pos, freq,
               interleaved_rope)
    v = lin(xn, p + "self_attn.v_proj").reshape(t, k, h)
    heads = []
    for j in range(n):
      s = q[:, j] @ kk[:, j * k // n].T / math.sqrt(h)
      s = np.where(causal, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      heads.append((s / s.sum(-1, keepdims=True)) @ v[:, j * k // n])
    x = x + np.concatenate(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
    xn = rms(x, w[p + "post_attention_layernorm.weight"])
    gate = xn @ w[p + "mlp.gate_proj.weight"].T
    up = xn @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T
