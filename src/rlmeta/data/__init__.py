"""Data preparation: RSS headlines, GSM8K and MATH problems, MATH meta-learning tasks.

Each step is a function (unit-tested without Snakemake) plus a ``*command`` that gives it its
place on the ``rlmeta`` command line (``rlmeta fetch-rss``, ``prepare-gsm8k``, ...).
"""
