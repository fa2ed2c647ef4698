"""Report of one experiment: report.md, self-contained report.html and PNGs (see --help)."""
from rlmeta.report.render import main

raise SystemExit(main())
