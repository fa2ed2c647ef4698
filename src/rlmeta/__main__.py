"""``python -m rlmeta <step>``: the same command line as the ``rlmeta`` console script."""
from rlmeta.cli import main

raise SystemExit(main())
