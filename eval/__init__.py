"""Evaluation and benchmarks (perplexity, decode speed) and the CLI."""
