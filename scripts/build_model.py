"""Build a tiny Qwen3 checkpoint: see `python scripts/build_model.py --help`."""
from rlmeta.models.build import main
main()
