"""Reinforcement learning: GRPO/GSPO objectives (NumPy, torch, MLX), UED prompt selection, trainers."""
