"""Sample completions of any checkpoint on mlx or torch and print them with their rewards (see --help)."""
from rlmeta.inspect import main

raise SystemExit(main())
