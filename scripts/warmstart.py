"""Warm-start (SFT) a checkpoint on reference completions: see `python scripts/warmstart.py --help`."""
from rlmeta.warmstart import main
main()
