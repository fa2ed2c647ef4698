"""rlmeta: reproducible RL and meta-learning experiments on language models."""
__version__ = "0.1.0"
