"""Summary across experiments: results/summary.parquet and results/summary.html (see --help)."""
from rlmeta.report.summary import main

raise SystemExit(main())
