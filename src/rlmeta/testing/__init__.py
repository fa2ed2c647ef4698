"""Helpers shared by the tests and the benchmarks (importable, so neither edits sys.path):
``models`` (tiny checkpoints, prompts and task tables), ``fixtures`` (synthetic experiment folders),
``workflow`` (Snakemake in a mirrored work directory), ``wandb_files`` (reading offline W&B runs),
``bench`` (the benchmarks' GEMM peak and model-FLOP counts)."""
