"""The pure-jnp references of latent decode attention (one per path)."""

from pallas_kernels.absorb_attention import \
    absorb_attention_reference as absorb_reference
from pallas_kernels.latent_rope_attention import \
    latent_rope_attention_reference as rope_reference


def reference_for(rope: bool):
  return rope_reference if rope else absorb_reference


__all__ = ["absorb_reference", "rope_reference", "reference_for"]
