"""Determinism on CPU: the same commit, lock and config, run twice from scratch on one machine, give
bit-identical checkpoints and equal ``summary.json`` numbers, on both backends.

The real Snakefile runs ``tests/fixtures/determinism.yaml`` (GSPO on MLX over headlines, GSPO with
TRL on GSM8K, shrunk to seconds) twice into two empty results folders: every job, from the feeds
and the tokenizer build to the warm starts, training, generation, scoring and evaluation, runs
twice. What makes it so: fixed seeds of every sampler (``rlmeta.policy.base.derive_seed``), data
order from those seeds, and thread counts fixed by each rule's ``threads`` (Snakemake exports them
as ``OMP_NUM_THREADS``). What cannot be made so is listed in docs/reproducibility.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlmeta.settings import ROOT
from rlmeta.testing.workflow import common_args, mirror_workflow, snakemake

pytestmark = pytest.mark.slow

CONFIG = ROOT / "tests" / "fixtures" / "determinism.yaml"
EXPERIMENTS = ("headlines_gspo", "gsm8k_gspo")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("determinism")
    workdir = mirror_workflow(base / "wf")
    runs = []
    for name in ("first", "second"):
        results = base / name
        out = snakemake(["--cores", "2", *common_args(results, [CONFIG])], cwd=workdir, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs.append(results)
    return runs


def max_abs_difference(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), f"{a}: tensor names differ"
    return max(float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)), initial=0.0))
               for k in ta)


def test_both_runs_wrote_the_same_checkpoints(two_runs):
    first, second = two_runs
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    # the built model, both warm starts, every checkpoint of both trainers (MLX: model and optimizer)
    for exp in EXPERIMENTS:
        assert Path(exp, "seed1234", "checkpoints", "final", "model.safetensors") in files
    assert any(p.name == "optimizer.safetensors" for p in files)
    assert sorted(p.relative_to(second) for p in second.rglob("*.safetensors")) == files
    assert {str(f): max_abs_difference(first / f, second / f) for f in files} == {str(f): 0.0 for f in files}


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_both_runs_wrote_the_same_evidence_of_training(two_runs, exp):
    """Evaluations during training, every rollout and the metrics rows: equal but for the timings."""
    import pyarrow.parquet as pq

    from rlmeta.rl.evidence import read_rollouts

    def rows(results, name):
        path = results / exp / "seed1234" / name
        table = read_rollouts(path) if path.is_dir() else pq.read_table(path)
        return [{k: v for k, v in r.items() if k not in ("seconds", "step_seconds")} for r in table.to_pylist()]

    for name in ("eval_curve.parquet", "rollouts", "train_metrics.parquet"):
        first, second = (rows(r, name) for r in two_runs)
        assert first == second and first, name


def numbers(summary: dict) -> dict:
    """summary.json less what names the run rather than measures it: paths and the provenance record."""
    out = {k: v for k, v in summary.items()
           if k not in ("provenance", "checkpoint", "checkpoints", "base_checkpoint")}
    out["sha256"] = (summary["base_checkpoint"]["sha256"], summary["checkpoint"]["sha256"])
    return out


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_both_runs_give_equal_summary_numbers(two_runs, exp):
    first, second = (json.loads((r / exp / "eval" / "summary.json").read_text()) for r in two_runs)
    assert numbers(first) == numbers(second)
    # the comparison is over real numbers: rewards, their intervals, task accuracy
    assert isinstance(first["reward"]["trained_mean"], float) and first["reward"]["n_prompts"] == 4
    if first["primary_accuracy"]:  # GSM8K; the headline template has none
        assert first["primary_accuracy"].removeprefix("accuracy/") in first["accuracy"]
    # and over trained weights: training moved them (a zero update would make the test vacuous)
    assert first["checkpoint"]["sha256"] != first["base_checkpoint"]["sha256"]
