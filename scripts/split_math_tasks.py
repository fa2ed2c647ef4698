"""Split MATH train rows into per-subject support/query/heldout (see --help)."""
from rlmeta.data.math_problems import main_split

raise SystemExit(main_split())
