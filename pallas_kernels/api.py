"""Compatibility entry point: see `pallas_kernels.latent_attention.api`."""

from pallas_kernels.latent_attention.api import (  # noqa: F401
    IMPLEMENTATIONS, latent_decode_attention, resolve,
    triton_unsupported_reason as unsupported_reason)
