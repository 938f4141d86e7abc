"""Flax NNX Llama-family decoder and its caches."""

from palu_jax.model.cache import Cache, LayerKV, init_kv_cache
from palu_jax.model.transformer import Transformer, from_params, random_model

__all__ = ["Cache", "LayerKV", "Transformer", "from_params", "init_kv_cache",
           "random_model"]
