"""GRPO/GSPO with TRL's GRPOTrainer (see --help)."""
from rlmeta.rl.trl_trainer import main

raise SystemExit(main())
