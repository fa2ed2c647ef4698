"""FOMAML meta-training over MATH subjects; run with python or torchrun (see --help)."""
from rlmeta.meta.fomaml import main

raise SystemExit(main())
