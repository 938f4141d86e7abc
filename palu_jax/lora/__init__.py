"""LoRA recovery fine-tuning of (compressed) models."""
