"""Sample completions for a prompts table into a responses parquet (see --help)."""
from rlmeta.rollout import main

raise SystemExit(main())
