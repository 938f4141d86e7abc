"""Zero-shot multiple-choice evaluation with lm-evaluation-harness
conventions: `tasks` (loaders and prompts), `scoring` (batched, jitted
log-likelihoods), `metrics` (acc, acc_norm)."""
