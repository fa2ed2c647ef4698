"""Prepare MATH train/test parquet (see --help)."""
from rlmeta.data.math_problems import main_prepare

raise SystemExit(main_prepare())
