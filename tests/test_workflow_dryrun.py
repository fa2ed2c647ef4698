"""Snakemake dry runs for the default config, every experiment config and every profile; lint; a real
job through the venv's snakemake without activating the venv; start-up errors are one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlmeta.settings import ROOT
from rlmeta.testing.workflow import path_without_slurm, snakemake_env

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run(args, cmd=SNAKEMAKE, env=None, **kw):
    env = env or snakemake_env()
    return subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_lint_is_clean():
    out = run(["--lint"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations" in out.stdout + out.stderr


def test_default_dry_run_plans_every_stage(tmp_path):
    out = run(["-n", "--cores", "2", "--config", f"results={tmp_path}/results"])
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for rule in ("fetch_rss", "build_headlines", "prepare_gsm8k", "prepare_math", "split_math_tasks",
                 "build_model", "make_prompts", "generate", "score", "train_mlx", "train_trl", "train_fomaml",
                 "train_meta_baseline"):
        assert f"rule {rule}:" in text or f"\n{rule} " in text, rule
    assert "Shell command: rlmeta train-trl --model" not in text  # launched: one process without torchrun
    assert ("Shell command: rlmeta launch --nproc 1 --nodes 1 --cpus-per-task 1 --direct-if-one -- train-trl "
            "--model") in text
    assert "Shell command: rlmeta train-mlx --model" in text  # every job runs one `rlmeta <step>` command


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_config_dry_run(path, tmp_path):
    # hub models and datasets are not reachable here: the start-up hub check is switched off for the dry run
    out = run(["-n", "--cores", "2", "--configfile", str(path), "--config", f"results={tmp_path}/results",
               "check_hub=false"])
    assert out.returncode == 0, out.stderr


def test_hub_experiment_offline_stops_at_start_up(tmp_path):
    path = ROOT / "config" / "experiments" / "gsm8k_grpo_qwen3.yaml"
    env = snakemake_env(HF_HUB_OFFLINE="1")
    out = run(["-n", "--cores", "1", "--configfile", str(path), "--config", f"results={tmp_path}/results"], env=env)
    assert out.returncode != 0
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "Hugging Face cache" in ln]
    assert len(lines) == 1 and "pre-download it with `hf download" in lines[0] and "Traceback" not in out.stderr


PROFILES = sorted(p.name for p in (ROOT / "profiles").iterdir() if (p / "config.yaml").exists())


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_dry_run(profile, tmp_path):
    out = run(["-n", "--profile", f"profiles/{profile}", "--config", f"results={tmp_path}/results"])
    assert out.returncode == 0, out.stderr


def test_config_error_is_one_clear_line(tmp_path):
    out = run(["-n", "--cores", "1", "--config", "seed=abc", f"results={tmp_path}/results"])
    assert out.returncode != 0
    assert "config error: 'seed' is \"abc\" (str); expected an integer" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_dataset_path_is_one_clear_line(tmp_path):
    typo = "datasets={'gsm8k': {'kind': 'gsm8k', 'source': 'resources/gsm8k_typo'}}"
    out = run(["-n", "--cores", "1", "--config", typo, f"results={tmp_path}/results"])
    assert out.returncode != 0
    assert "datasets.gsm8k.source: resources/gsm8k_typo does not exist" in out.stderr and "Traceback" not in out.stderr


def test_mlx_experiment_refused_under_slurm_platform(tmp_path):
    out = run(["-n", "--cores", "1", "--config", "platform=slurm", f"results={tmp_path}/results",
               "--", f"{tmp_path}/results/headlines_gspo/seed1234/train_metrics.parquet"])
    assert out.returncode != 0
    assert "uses backend mlx" in out.stdout + out.stderr


def test_venv_snakemake_runs_a_job_without_activation(tmp_path):
    """``.venv/bin/snakemake`` with a PATH that does not hold the venv: the rule runs the venv's python."""
    venv_snakemake = Path(sys.executable).parent / "snakemake"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = path_without_slurm("/usr/bin:/bin")
    target = f"{tmp_path}/results/data/gsm8k/test.parquet"
    out = run(["--cores", "1", "--config", f"results={tmp_path}/results", "--", target], cmd=[str(venv_snakemake)],
              env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import pyarrow.parquet as pq

    assert pq.read_table(target).num_rows == 200


def test_three_seeds_plan_three_trainings_on_shared_data(tmp_path):
    """seeds: [1, 2, 3] on one experiment: three training runs, three trained generate/score jobs, and one of
    everything they share (data, model, prompts, warm start, base responses), then one evaluation over all."""
    from rlmeta.testing.workflow import dry_run, job_keys

    cfg = tmp_path / "seeds.yaml"
    cfg.write_text("run_experiments: [gsm8k_gspo]\nexperiments:\n  gsm8k_gspo:\n    seeds: [1, 2, 3]\n")
    _, planned = dry_run(ROOT, tmp_path / "results", [cfg])
    e = "exp=gsm8k_gspo"
    per_seed = {(rule, f"{e}, {w}") for s in (1, 2, 3)
                for rule, w in (("train_trl", f"seed={s}"), ("generate", f"policy=seed{s}"),
                                ("score", f"policy=seed{s}"))}
    keys = job_keys(planned)
    assert {k for k in keys if "seed" in k[1]} == per_seed
    shared = {k for k in keys if "seed" not in k[1]}
    assert shared == {("prepare_gsm8k", "dataset=gsm8k"), ("build_model", "model=tiny"), ("make_prompts", e),
                      ("warmstart", next(k[1] for k in shared if k[0] == "warmstart")),
                      ("generate", f"{e}, policy=base"), ("score", f"{e}, policy=base"), ("provenance", e),
                      ("evaluate", e), ("report", e), ("summary", ""), ("all", ""),
                      ("make_prompts", "exp=gsm8k_grpo_lora")}  # the shared warm start trains on its prompts
    ev = next(j for j in planned if j["rule"] == "evaluate")
    for s in (1, 2, 3):
        assert f"{tmp_path}/results/gsm8k_gspo/rewards/seed{s}.parquet" in ev["input"]
    trains = [j for j in planned if j["rule"] == "train_trl"]
    assert sorted(o for j in trains for o in j["output"] if o.endswith("train_metrics.parquet")) == [
        f"{tmp_path}/results/gsm8k_gspo/seed{s}/train_metrics.parquet" for s in (1, 2, 3)]
