"""Each trainer learns a reasoning-gym task from a warm start, and a flipped advantage sign does not.

The task: reasoning-gym's ``letter_counting`` on texts of 1-3 words ("How many times does the letter "h"
appear in the text: "hundred"?"), scored by the task's own ``score_answer`` through ``rg_correct`` (the only
reward, weight +1, or -1 for the control: the group advantages flip sign). A tiny Qwen3 (BPE vocabulary of
300, hidden size 32) is warm-started for 60 supervised steps on the gold completions: it then answers some
held-out questions right (accuracy 0.262 at temperature 1), far below the ceiling. 15 RL steps raise the
held-out accuracy (held-out items: ``distinct`` data, no evaluated question is trained on) by +0.180 [+0.109,
+0.254] (MLX GRPO) and +0.133 [+0.059, +0.207] (TRL GRPO), paired bootstrap 95% intervals; the flipped runs fall
to 0.000. Flipping the advantage sign inside either trainer instead (by hand, once) fails both learning tests.
Gold is "1" for most items; on the workflow's larger tiny model the gain was checked to be mostly the usual
answer and a well-formed ``<answer>`` block, not counting letters, and here it is likely the same. One-digit
addition did not rise in any setting tried (config/experiments/reasoning_gym.yaml).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlmeta.data.reasoning_gym import prepare_reasoning_gym
from rlmeta.evaluation.stats import paired_bootstrap
from rlmeta.io import write_table
from rlmeta.models.build import build_tiny_model
from rlmeta.prompts import build_prompts
from rlmeta.rewards import REGISTRY
from rlmeta.settings import ROOT, ModelBuild, ReasoningGymDataset, RLJob, WandbSettings, WarmstartSettings, parse
from rlmeta.tables import PROMPTS
from rlmeta.warmstart import warmstart

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = ModelBuild(tokenizer="bpe", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  intermediate_size=64)
DATASET = {"kind": "reasoning_gym", "tasks": {"letter_counting": {"min_words": 1, "max_words": 3}},
           "train_size": 256, "eval_size": 64, "distinct": True, "seed": 3}
WARMSTART = WarmstartSettings(steps=60, batch_size=16, learning_rate=1e-2, max_seq_len=128)
TRAIN = {"steps": 15, "batch_prompts": 8, "group_size": 8, "learning_rate": 2e-3, "temperature": 1.0,
         "max_new_tokens": 16, "checkpoint_every": 1000}
SAMPLES, TEMPERATURE = 4, 1.0
OFF = WandbSettings(mode="disabled")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, warm-started model, prompts table, per-prompt held-out accuracy of the warm start)."""
    root = tmp_path_factory.mktemp("rg_learning")
    model = build_tiny_model(root / "model", TINY, [ROOT / "resources/gsm8k/train.jsonl"], 0)
    prepare_reasoning_gym(parse(ReasoningGymDataset, DATASET), root / "data")
    tables = [pq.read_table(root / "data" / f"{s}.parquet") for s in ("train", "test")]
    prompts = root / "prompts.parquet"
    write_table(prompts, build_prompts("rg_learn", "reasoning_gym", tables, seed=3), PROMPTS)
    base = warmstart(model, prompts, root / "warmstart", WARMSTART, seed=1234, backend="torch")
    return root, base, prompts, accuracy(base, prompts)


def accuracy(model_dir, prompts) -> np.ndarray:
    """Per held-out prompt, the share of ``SAMPLES`` completions that ``rg_correct`` scores 1 (MLX sampling,
    the same seeds for every policy)."""
    from rlmeta.policy import load_policy

    rows = [r for r in pq.read_table(prompts).to_pylist() if r["split"] == "eval"]
    policy = load_policy(model_dir, "mlx")
    acc = np.zeros((len(rows), SAMPLES))
    for b in range(0, len(rows), 32):
        chunk = rows[b:b + 32]
        gens = policy.generate([r["prompt"] for r in chunk], SAMPLES, temperature=TEMPERATURE,
                               max_new_tokens=TRAIN["max_new_tokens"], seed=99 + b)
        refs = [chunk[g.prompt_index]["reference"] for g in gens]
        scores = REGISTRY["rg_correct"].score([g.text for g in gens], refs)
        for g, s in zip(gens, scores.tolist()):
            acc[b + g.prompt_index, g.sample_idx] = s
    return acc.mean(axis=1)


def job(backend: str, weight: float) -> RLJob:
    train = TRAIN | ({"trl": {"report_to": "none"}} if backend == "torch" else {})
    return RLJob.model_validate({"algorithm": "grpo", "rewards": {"rg_correct": weight}, "backend": backend,
                                 "train": train})


def trained_accuracy(setup, backend: str, weight: float) -> tuple[float, float, tuple[float, float, float], list]:
    """(base mean, trained mean, paired difference (mean, low, high), per-step train rewards) of one RL run."""
    root, base_model, prompts, base = setup
    out = root / f"{backend}_{weight:+g}"
    if backend == "mlx":
        from rlmeta.rl.mlx_trainer import train_mlx as train
    else:
        from rlmeta.rl.trl_trainer import train_trl as train
    final = train(base_model, prompts, job(backend, weight), out / "checkpoints", out / "train_metrics.parquet", OFF,
                  seed=0)
    after = accuracy(final, prompts)
    rewards = pq.read_table(out / "train_metrics.parquet").column("reward/rg_correct").to_pylist()
    result = float(base.mean()), float(after.mean()), paired_bootstrap(after - base, seed=0), rewards
    print(f"{backend} weight {weight:+g}: held-out accuracy {result[0]:.3f} -> {result[1]:.3f}, "
          f"difference {result[2][0]:+.3f} [{result[2][1]:+.3f}, {result[2][2]:+.3f}]")
    return result


def test_warm_start_leaves_room(setup):
    *_, base = setup
    assert len(base) == 64
    assert 0.1 < base.mean() < 0.5, base.mean()


def assert_learns(result):
    before, after, (diff, low, _), rewards = result
    assert diff == pytest.approx(after - before)
    assert diff >= 0.07 and low > 0, result  # measured: +0.180 [+0.109, +0.254] (MLX), +0.133 [+0.059, +0.207] (TRL)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]), rewards


def assert_does_not_learn(result):
    before, after, (diff, _, high), rewards = result
    assert after <= before - 0.1 and high < 0, result  # measured: falls to 0.000 on both trainers
    assert np.mean(rewards[-3:]) < np.mean(rewards[:3]), rewards


def test_mlx_grpo_raises_held_out_accuracy(setup):
    pytest.importorskip("mlx.core")
    assert_learns(trained_accuracy(setup, "mlx", 1.0))


def test_mlx_flipped_advantage_sign_does_not(setup):
    pytest.importorskip("mlx.core")
    assert_does_not_learn(trained_accuracy(setup, "mlx", -1.0))


def test_trl_grpo_raises_held_out_accuracy(setup):
    assert_learns(trained_accuracy(setup, "torch", 1.0))


def test_trl_flipped_advantage_sign_does_not(setup):
    assert_does_not_learn(trained_accuracy(setup, "torch", -1.0))


def test_the_task_is_scored_by_its_own_verifier(setup):
    _, _, prompts, _ = setup
    row = next(r for r in pq.read_table(prompts).to_pylist() if r["split"] == "eval")
    ref = json.loads(row["reference"])
    assert ref["task"] == "letter_counting" and row["prompt"][1]["content"].startswith("How many times does the letter")
    gold, wrong = f"<answer>{ref['answer']}</answer>", f"<answer>{int(ref['answer']) + 1}</answer>"
    assert REGISTRY["rg_correct"].score([gold, wrong], [row["reference"]] * 2).tolist() == [1.0, 0.0]
