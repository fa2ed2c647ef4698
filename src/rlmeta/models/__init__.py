"""Building tiny Qwen3 checkpoints (tokenizer + weights) and resolving real models."""
