"""Prepare GSM8K train/test parquet (see --help)."""
from rlmeta.data.gsm8k import main

raise SystemExit(main())
