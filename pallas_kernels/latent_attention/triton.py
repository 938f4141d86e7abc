"""The Pallas Triton kernels of latent decode attention (any CUDA GPU; the
path pre-Hopper GPUs and float32 / quantized caches take)."""

from pallas_kernels.absorb_attention import absorb_attention
from pallas_kernels.latent_rope_attention import latent_rope_attention


def op_for(rope: bool):
  return latent_rope_attention if rope else absorb_attention


__all__ = ["absorb_attention", "latent_rope_attention", "op_for"]
