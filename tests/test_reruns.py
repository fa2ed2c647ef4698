"""What Snakemake re-runs after a config change, on a default workflow marked as done.

The whole default workflow is marked as done without running it: every output of a
dry run is created (empty file, or empty folder for a ``directory()`` output) and
``snakemake --touch --forceall`` then touches them in DAG order and records each
job's metadata (params, input set, code) in ``.snakemake/metadata``, as a real run
would.  A later ``snakemake -n`` says "Nothing to be done"; an extra
``--configfile`` that changes one knob must then plan exactly the jobs that
depend on it.

Snakemake 9's default ``--rerun-triggers`` are ``mtime params input software-env
code``:

- params: a job's non-derived ``params`` differ from the recorded ones (a reward
  weight reaches ``score`` through ``params.rewards`` and ``train_*`` through
  ``params.spec``; ``eval.*`` reaches ``generate`` through ``params.ev``);
- input: the *set* of input paths differs (e.g. a new base-policy folder);
- mtime: an input is newer than the output (and its checksum changed), which is how
  a re-run job drags its consumers along ("Input files updated by another job");
- code: the rule's shell command text changed (not the scripts it calls);
- software-env: the conda environment file changed (only with ``--sdm conda``).

Each Snakemake call here runs in a temporary copy of the workflow (symlinks), so its
``.snakemake`` state never mixes with the repository's, and writes to a temporary
results folder (``--config results=...``).  The helpers live in
``rlmeta.testing.workflow`` (``benchmarks/dag.py`` and ``tests/test_sweeps.py`` use them too).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rlmeta.testing.workflow import (
    EXPERIMENT_CONFIGS,
    dry_run,
    job_key,
    job_keys,
    mark_done,
    mirror_workflow,
    nothing_to_do,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """(workdir, results, marked jobs) of the default workflow, every job marked done."""
    base = tmp_path_factory.mktemp("reruns")
    workdir = mirror_workflow(base / "wf")
    results = base / "results"
    jobs = mark_done(workdir, results)
    return workdir, results, jobs


def override(tmp_path: Path, text: str, name: str = "override.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_marked_done_default_is_up_to_date(done):
    workdir, results, jobs = done
    assert len(jobs) >= 40 and {j["rule"] for j in jobs} >= {"train_trl", "train_mlx", "train_fomaml", "summary"}
    out, planned = dry_run(workdir, results)
    assert nothing_to_do(out), sorted(job_keys(planned))
    assert planned == []


def test_reward_weight_change_reruns_scoring_training_and_downstream_only(done, tmp_path):
    workdir, results, _ = done
    cfg = override(tmp_path, "experiments:\n  gsm8k_gspo:\n    rewards: {gsm8k_correct: 2.0}\n")
    _, planned = dry_run(workdir, results, [cfg])
    exp = "exp=gsm8k_gspo"
    assert job_keys(planned) == {
        ("score", f"{exp}, policy=base"),       # rewards/base.parquet's total changes
        ("train_trl", f"{exp}, seed=1234"),                    # the reward is part of the training spec
        ("generate", f"{exp}, policy=seed1234"),
        ("score", f"{exp}, policy=seed1234"),
        ("provenance", exp),                   # it hashes the new tables and times the new jobs
        ("evaluate", exp),
        ("report", exp),
        ("summary", ""),
        ("all", ""),
    }
    # base responses, prompts and the warm start shared with gsm8k_grpo_lora stay as they are
    by_key = {job_key(j): j for j in planned}
    assert by_key[("score", f"{exp}, policy=base")]["reason"].startswith("Params have changed")
    assert by_key[("train_trl", f"{exp}, seed=1234")]["reason"].startswith("Params have changed")


def test_reward_weight_change_is_invisible_to_the_mtime_trigger_alone(done, tmp_path):
    """The params trigger is what notices a config change; mtime alone sees nothing."""
    workdir, results, _ = done
    cfg = override(tmp_path, "experiments:\n  gsm8k_gspo:\n    rewards: {gsm8k_correct: 2.0}\n")
    out, planned = dry_run(workdir, results, [cfg], extra=["--rerun-triggers", "mtime"])
    assert nothing_to_do(out) and planned == []


def test_eval_change_does_not_retrain(done, tmp_path):
    workdir, results, _ = done
    cfg = override(tmp_path, "experiments:\n  gsm8k_gspo:\n    eval: {samples: 2}\n")
    _, planned = dry_run(workdir, results, [cfg])
    exp = "exp=gsm8k_gspo"
    assert job_keys(planned) == {
        ("generate", f"{exp}, policy=base"),
        ("generate", f"{exp}, policy=seed1234"),
        ("score", f"{exp}, policy=base"),
        ("score", f"{exp}, policy=seed1234"),
        ("provenance", exp),
        ("evaluate", exp),
        ("report", exp),
        ("summary", ""),
        ("all", ""),
    }


def test_named_experiment_config_plans_only_that_experiment(done):
    """``--configfile config/experiments/X.yaml`` next to a finished default: only X (and
    the summary, which now lists X only) is planned."""
    workdir, results, _ = done
    # the hub is not reachable here: its start-up check is off for this dry run
    _, planned = dry_run(workdir, results, [EXPERIMENT_CONFIGS / "gsm8k_gspo_qwen3.yaml"], ["check_hub=false"])
    exp = "exp=gsm8k_gspo_qwen3"
    assert job_keys(planned) == {
        ("prepare_gsm8k", "dataset=gsm8k_hub"),
        ("make_prompts", exp),
        ("generate", f"{exp}, policy=base"),
        ("generate", f"{exp}, policy=seed1234"),
        ("score", f"{exp}, policy=base"),
        ("score", f"{exp}, policy=seed1234"),
        ("train_trl", f"{exp}, seed=1234"),
        ("provenance", exp),
        ("evaluate", exp),
        ("report", exp),
        ("summary", ""),
        ("all", ""),
    }


SWEEP = """sweeps:
  {name}:
    experiment: gsm8k_grpo_lora
    grid:
      train.learning_rate: [1.0e-3, 4.0e-3]
"""


def _new_points_only(planned, sweep):
    """Planned jobs that belong to neither the sweep's points nor the summary."""
    return sorted(k for k in job_keys(planned)
                  if k[0] not in ("summary", "all") and not k[1].startswith(f"exp={sweep}__"))


def test_adding_a_sweep_reruns_nothing_of_the_finished_experiments(done, tmp_path):
    workdir, results, _ = done
    cfg = override(tmp_path, SWEEP.format(name="lr"))
    _, planned = dry_run(workdir, results, [cfg])
    assert _new_points_only(planned, "lr") == []
    points = {j["wildcards"].get("exp") for j in planned} - {None}
    assert points == {"lr__learning_rate=0.001", "lr__learning_rate=0.004"}
    # the points reuse the finished warm start of gsm8k_grpo_lora
    assert not any(j["rule"] == "warmstart" for j in planned)


def test_sweep_name_does_not_move_the_shared_warm_start(done, tmp_path):
    workdir, results, _ = done
    cfg = override(tmp_path, SWEEP.format(name="a_lr"))
    _, planned = dry_run(workdir, results, [cfg])
    assert _new_points_only(planned, "a_lr") == []


def test_switching_wandb_mode_does_not_retrain(done, tmp_path):
    workdir, results, _ = done
    cfg = override(tmp_path, "wandb: {mode: online}\n")
    _, planned = dry_run(workdir, results, [cfg])
    assert sorted(job_keys(planned)) == []
