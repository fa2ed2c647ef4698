"""The command line shared by the RL trainers (``scripts/train_mlx.py``, ``scripts/train_trl.py``)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable


def run_trainer(train: Callable, prog: str, description: str, out_help: str, argv: list[str] | None = None) -> int:
    """Parse the trainer flags, then call ``train(model, prompts, experiment, out, metrics, wandb, seed)``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", required=True, help="base checkpoint folder (or hub id)")
    p.add_argument("--prompts", required=True, help="prompts parquet (train split used)")
    p.add_argument("--experiment-json", required=True,
                   help="experiment spec as JSON (algorithm, rewards, reward_params, train) or a .json file")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--metrics", required=True, help="train_metrics.parquet to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline")
    p.add_argument("--wandb-project", default="rlmeta")
    p.add_argument("--wandb-entity", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = a.experiment_json
    experiment = json.loads(spec if spec.lstrip().startswith("{") else Path(spec).read_text())
    train(a.model, a.prompts, experiment, a.out, a.metrics,
          {"mode": a.wandb_mode, "project": a.wandb_project, "entity": a.wandb_entity}, a.seed)
    return 0
