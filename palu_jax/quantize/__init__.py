"""Latent-cache quantization: Hadamard rotation and packed integer codes."""
