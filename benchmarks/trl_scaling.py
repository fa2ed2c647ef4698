"""Training throughput of TRL GRPO with 1 and 2 CPU processes on this machine, at the same global batch.

Builds a small Qwen3 (BPE tokenizer from the bundled corpus; ``--hidden``/``--layers`` set its size) and a
toy prompts table in a temporary folder, then runs the train_trl rule's own command line
(``rlmeta launch --nproc N --direct-if-one -- train-trl ...``; one thread per process, gloo between the
two) with ``train.distributed.nproc`` 1 and 2 and the same ``batch_prompts x group_size`` per optimizer
step. Tokens are TRL's ``num_tokens`` (prompt + completion tokens of the whole global batch) and the time is
the sum of ``step_seconds`` in train_metrics.parquet, the first ``--warmup`` steps left out. Prints a
table, then as the LAST line one JSON object with tokens_per_s_1, tokens_per_s_2 and scaling = tps2 / tps1.

    .venv/bin/python benchmarks/trl_scaling.py [--steps 8] [--hidden 256 --layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.settings import ROOT

PLUGIN = ROOT / "tests" / "data" / "plugin_reward.py"  # char_share: a reward that costs nothing to score


def build(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A Qwen3 of this size and 16 train prompts (rlmeta.testing.models.toy_write_task at another width)."""
    from rlmeta.models import build as model_build
    from rlmeta.settings import ModelBuild
    from rlmeta.testing.models import toy_write_task

    real = model_build.build_tiny_model

    def sized(out, spec, corpus, seed):  # the toy task's model, made wider and deeper
        spec = ModelBuild.model_validate({**spec.model_dump(), "hidden_size": hidden, "num_layers": layers,
                                          "intermediate_size": 4 * hidden})
        return real(out, spec, corpus, seed)

    model_build.build_tiny_model = sized
    try:
        return toy_write_task(work, ["cats", "dogs", "food", "balls"])
    finally:
        model_build.build_tiny_model = real


def run(model: Path, prompts: Path, train: dict, nproc: int, out: Path, warmup: int) -> dict:
    """One launch of the rule's command; returns the steady-state tokens/s and s/step and the wall time."""
    import pyarrow.parquet as pq

    job = {"algorithm": "grpo", "rewards": {"char_share": 1.0}, "reward_params": {"char_share": {"chars": "a"}},
           "train": {**train, "distributed": {"nproc": nproc}}}
    cmd = [sys.executable, "-m", "rlmeta", "launch", "--nproc", str(nproc), "--direct-if-one", "--",
           "train-trl", "--reward-modules", str(PLUGIN), "--model", str(model), "--prompts", str(prompts),
           "--job", json.dumps(job), "--out", str(out / "checkpoints"), "--metrics", str(out / "m.parquet"),
           "--eval-curve", str(out / "curve.parquet"), "--rollouts", str(out / "rollouts"), "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"train-trl with {nproc} process(es) failed ({p.returncode}):\n{p.stderr[-4000:]}")
    rows = pq.read_table(out / "m.parquet").to_pylist()
    first, last = rows[warmup - 1], rows[-1]  # tokens are cumulative
    tokens, secs = last["tokens"] - first["tokens"], sum(r["step_seconds"] for r in rows[warmup:])
    return {"tokens_per_s": tokens / secs, "s_per_step": secs / (len(rows) - warmup),
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit (default 32)")
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    train = {"steps": a.steps, "batch_prompts": a.batch_prompts, "group_size": a.group_size, "learning_rate": 1e-3,
             "max_new_tokens": a.max_new_tokens, "temperature": 1.0, "checkpoint_every": 1000, "eval_every": None,
             "log_rollouts": False, "trl": {"report_to": "none"}}
    with tempfile.TemporaryDirectory(prefix="trl-scaling-") as tmp:
        work = Path(tmp)
        model, prompts = build(work, a.hidden, a.layers)
        res = {n: run(model, prompts, train, n, work / f"run{n}", a.warmup) for n in (1, 2)}
    scaling = res[2]["tokens_per_s"] / res[1]["tokens_per_s"]
    print(f"TRL GRPO, hidden {a.hidden} x {a.layers} layers, global batch {a.batch_prompts} x {a.group_size}, "
          f"{a.max_new_tokens} new tokens, {a.steps - a.warmup} timed steps, 1 thread per process")
    print(f"{'processes':>9} {'tokens/s':>10} {'s/step':>8} {'wall s':>8}")
    for n, r in res.items():
        print(f"{n:>9} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} {r['wall_s']:>8.1f}")
    print(f"scaling (2 / 1): {scaling:.2f} (target >= 1.5)")
    print(json.dumps({"tokens_per_s_1": round(res[1]["tokens_per_s"], 1),
                      "tokens_per_s_2": round(res[2]["tokens_per_s"], 1), "scaling": round(scaling, 3),
                      "hidden": a.hidden, "layers": a.layers, "steps": a.steps, "warmup": a.warmup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
