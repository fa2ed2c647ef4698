"""Data preparation: RSS headlines, GSM8K and MATH problems, MATH meta-learning tasks.

Each step is a function (unit-tested without Snakemake) plus an argparse ``main_*``
entry point that the thin wrappers in ``scripts/`` call.
"""
