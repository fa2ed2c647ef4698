"""Evaluation: paired base-versus-trained comparison with bootstrap intervals and task metrics."""
from rlmeta.evaluation.evaluate import evaluate
from rlmeta.evaluation.stats import paired_bootstrap, paired_comparison, per_prompt_means

__all__ = ["evaluate", "paired_bootstrap", "paired_comparison", "per_prompt_means"]
