"""Paired base-versus-trained evaluation of one RL experiment (see --help)."""
from rlmeta.evaluation.evaluate import main

raise SystemExit(main())
