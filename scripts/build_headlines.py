"""Parse feed snapshots into headlines.parquet (see --help)."""
from rlmeta.data.rss import main_build

raise SystemExit(main_build())
