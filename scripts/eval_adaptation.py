"""Adapt base and meta-learned initialisations on held-out problems and compare (see --help)."""
from rlmeta.meta.adaptation_eval import main

raise SystemExit(main())
