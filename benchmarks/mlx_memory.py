"""Peak memory of the MLX trainer per configuration: weights dtype, full fine-tuning or LoRA, KL or not.

Each configuration runs in a fresh process: it builds (once, cached in /tmp) a Qwen3-shaped model with
random weights, opens ``MLXTrainer`` on it and takes two training steps (generation, the reference's
log-probs when beta > 0, forward, backward, AdamW), then reports MLX's peak memory
(``mx.get_peak_memory``: every buffer MLX allocated, the weights, optimizer states and activations). With
LoRA the KL reference is the base itself with the adapters switched off (``rlmeta.policy.lora.
mlx_adapters_off``), so it costs no second copy of the weights; full fine-tuning with KL keeps a frozen
copy. On a Mac the numbers are unified (GPU) memory; on Linux ``mlx[cpu]``, host memory.

    .venv/bin/python benchmarks/mlx_memory.py [--hidden 512] [--layers 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {  # name: train overrides
    "float32 full, no KL": {"beta": 0.0},
    "float32 full + KL (frozen copy)": {"beta": 0.04},
    "float32 LoRA + KL (adapters off)": {"beta": 0.04, "lora": {"r": 8, "alpha": 16}},
    "bfloat16 full + KL (frozen copy)": {"beta": 0.04, "dtype": "bfloat16"},
    "bfloat16 LoRA + KL (adapters off)": {"beta": 0.04, "lora": {"r": 8, "alpha": 16}, "dtype": "bfloat16"},
    "bfloat16 full + KL, gradient checkpointing": {"beta": 0.04, "dtype": "bfloat16", "gradient_checkpointing": True},
}

ONE = """
import json, sys
import mlx.core as mx
from rlmeta.rl.mlx_trainer import MLXTrainer
from rlmeta.settings import RLJob
from rlmeta.testing.rewards import digit_share, registered
model, prompts, train = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with registered("toy_digits", digit_share, "share of digit characters"):
    job = RLJob.model_validate({"algorithm": "grpo", "rewards": {"toy_digits": 1.0}, "backend": "mlx", "train": {
        "steps": 2, "batch_prompts": 4, "group_size": 4, "max_new_tokens": 32, "learning_rate": 1e-4,
        "checkpoint_every": 100, "eval_every": None, **train}})
    tr = MLXTrainer(model, prompts, job, seed=0)
    weights = mx.get_active_memory()
    for _ in range(2):
        tr.train_step()
print(json.dumps({"weights_mb": weights / 2**20, "peak_mb": mx.get_peak_memory() / 2**20}))
"""


def build(folder: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """The model (cached per shape) and a prompts table of 8 train rows."""
    from rlmeta.io import write_records
    from rlmeta.models.build import build_tiny_model
    from rlmeta.settings import ROOT, ModelBuild
    from rlmeta.tables import PROMPTS

    model = folder / f"qwen3_h{hidden}_l{layers}"
    if not (model / "config.json").exists():
        shape = ModelBuild(tokenizer="bpe", vocab_size=2048, hidden_size=hidden, num_layers=layers,
                           num_heads=max(1, hidden // 64), num_kv_heads=max(1, hidden // 128),
                           intermediate_size=hidden * 3)
        build_tiny_model(model, shape, [ROOT / "resources/gsm8k/train.jsonl"], 0)
    prompts = folder / "prompts.parquet"
    rows = [{"prompt_id": f"p{i}", "experiment": "bench", "item_id": f"i{i}", "task": "t", "split": "train",
             "prompt": [{"role": "user", "content": f"Write the number {i} in digits, then more digits."}],
             "reference": None, "reference_completion": None} for i in range(8)]
    write_records(prompts, rows, PROMPTS)
    return model, prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the model (default 512)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    a = p.parse_args()
    model, prompts = build(Path(tempfile.gettempdir()) / "rlmeta-bench-memory", a.hidden, a.layers)
    rows = {}
    print(f"{'configuration':<36}{'weights MiB':>12}{'peak MiB':>10}")
    for name, train in CONFIGS.items():
        out = subprocess.run([sys.executable, "-c", ONE, str(model), str(prompts), json.dumps(train)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: {out.stderr[-2000:]}")
        rows[name] = {k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        print(f"{name:<36}{rows[name]['weights_mb']:>12.1f}{rows[name]['peak_mb']:>10.1f}")
    print(json.dumps({"benchmark": "mlx_memory", "hidden": a.hidden, "layers": a.layers, "configs": rows}))


if __name__ == "__main__":
    main()
