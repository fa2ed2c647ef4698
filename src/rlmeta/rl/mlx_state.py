"""Resumable state of the MLX trainer: prompt order, checkpoints, optimizer and RNG state.

A checkpoint ``<out>/<step>/`` is a portable model folder (``rlmeta.checkpoints.save_mlx``:
transformers and ``mlx_lm.load`` open it as-is) plus ``optimizer.safetensors`` (the flattened AdamW
state), ``adapter/`` (LoRA runs: the unmerged adapters training resumes from),
``trainer_state.json`` (step, counters, numpy/sampler/UED state, the run's spec), the metrics
rows so far, the evaluation rows so far and the rollouts since the previous checkpoint
(``rlmeta.rl.evidence``). No pickle. The folder is built aside and renamed in, its marker written last.

MLX has no setter for its global PRNG key, so the trainer reseeds ``mx.random`` from
``(seed, step)`` before every rollout and update: the key at a step boundary is a function of
the step, and the JSON records it for inspection.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from rlmeta import checkpoints

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"


class EpochSampler:
    """Uniform prompt order: a fresh seeded permutation per epoch, consumed ``k`` at a time.

    A batch that crosses an epoch boundary takes the rest of one permutation and the start of
    the next. Same interface as ``UEDSampler`` (``sample``, ``update``, ``state_dict``).
    """

    def __init__(self, n_prompts: int, seed: int = 0):
        self.n, self.rng = n_prompts, np.random.default_rng(seed)
        self.order: list[int] = []
        self.pos, self.epoch = 0, 0

    def sample(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(self.n).tolist(), 0
                self.epoch += 1
            take = min(k - len(out), self.n - self.pos)
            out += self.order[self.pos:self.pos + take]
            self.pos += take
        return out

    def update(self, indices, group_rewards) -> None:
        """Uniform order ignores rewards."""

    def state_dict(self) -> dict:
        return {"n_prompts": self.n, "order": list(self.order), "pos": self.pos, "epoch": self.epoch,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["n_prompts"] != self.n:
            raise ValueError(f"state is for {state['n_prompts']} prompts, sampler has {self.n}")
        self.order, self.pos, self.epoch = list(state["order"]), state["pos"], state["epoch"]
        self.rng.bit_generator.state = state["rng"]


def rng_key() -> list[int]:
    """The current global ``mx.random`` key as two uint32 (for the record)."""
    return [int(v) for v in np.array(mx.random.state[0]).ravel()]


def save_checkpoint(path: str | Path, policy, optimizer, state: dict, metrics, more=None) -> Path:
    """Write a complete checkpoint folder atomically (see the module docstring); ``metrics``: a MetricsTable;
    ``more(folder)``: writes further files into the folder being built (the evaluation rows, the rollouts)."""
    from rlmeta.io import write_json
    from rlmeta.policy.lora import mlx_merged_weights, save_adapter
    from rlmeta.tracking import METRICS_FILE

    def extra(tmp: Path) -> None:
        if getattr(policy, "lora", None):
            save_adapter(policy, tmp / ADAPTER_DIR)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        write_json(tmp / STATE_FILE, {**state, "mx_random_key": rng_key()})
        metrics.write(tmp / METRICS_FILE)
        if more is not None:
            more(tmp)

    return checkpoints.save_mlx(mlx_merged_weights(policy.model), policy.config, policy.tokenizer, path,
                                policy.source, extra=extra, step=state["step"])


def read_state(ckpt: str | Path) -> dict | None:
    """The checkpoint's trainer state, or None when it cannot be read."""
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def load_weights(policy, ckpt: str | Path) -> None:
    """Trainable weights from a checkpoint: the adapters (LoRA) or the full model."""
    ckpt = Path(ckpt)
    if getattr(policy, "lora", None):
        from rlmeta.policy.lora import MLX_ADAPTER

        policy.model.load_weights(str(ckpt / ADAPTER_DIR / MLX_ADAPTER), strict=False)
    else:
        policy.model.load_weights(str(ckpt / "model.safetensors"))
    mx.eval(policy.model.parameters())


def load_optimizer(optimizer, ckpt: str | Path) -> None:
    """Restore the optimizer state tree saved by ``save_checkpoint``."""
    flat = mx.load(str(Path(ckpt) / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(flat.items()))
