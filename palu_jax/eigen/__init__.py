"""Eigen Attention (Saxena et al., 2024): attention in a calibrated low-rank
space, a second way to shrink the KV cache next to Palu."""
