"""Merge a LoRA adapter into its base model as a full checkpoint (see --help)."""
from rlmeta.policy.lora import main

raise SystemExit(main())
