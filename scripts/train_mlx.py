"""Online GRPO/GSPO on MLX (see --help)."""
from rlmeta.rl.mlx_trainer import main

raise SystemExit(main())
