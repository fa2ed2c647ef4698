"""Snakemake dry runs for the default config, every experiment config and every profile; lint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run(args, **kw):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(SNAKEMAKE + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_lint_is_clean():
    out = run(["--lint"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations" in out.stdout + out.stderr


def test_default_dry_run_plans_every_stage(tmp_path):
    out = run(["-n", "--cores", "2", "--config", f"results={tmp_path}/results"])
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for rule in ("fetch_rss", "build_headlines", "prepare_gsm8k", "prepare_math", "split_math_tasks",
                 "build_model", "make_prompts", "generate", "score", "train_mlx", "train_trl", "train_fomaml"):
        assert f"rule {rule}:" in text or f"\n{rule} " in text, rule


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_config_dry_run(path, tmp_path):
    out = run(["-n", "--cores", "2", "--configfile", str(path), "--config", f"results={tmp_path}/results"])
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").iterdir() if (p / "config.yaml").exists()))
def test_profile_dry_run(profile, tmp_path):
    out = run(["-n", "--profile", f"profiles/{profile}", "--config", f"results={tmp_path}/results"])
    assert out.returncode == 0, out.stderr


def test_config_error_is_one_clear_line(tmp_path):
    out = run(["-n", "--cores", "1", "--config", "seed=abc", f"results={tmp_path}/results"])
    assert out.returncode != 0
    assert "config error: 'seed' is \"abc\" (str); expected integer" in out.stderr


def test_mlx_experiment_refused_under_slurm_platform(tmp_path):
    out = run(["-n", "--cores", "1", "--config", "platform=slurm", f"results={tmp_path}/results",
               "--", f"{tmp_path}/results/headlines_gspo/train_metrics.parquet"])
    assert out.returncode != 0
    assert "uses backend mlx" in out.stdout + out.stderr
