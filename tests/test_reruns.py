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
results folder (``--config results=...``).  ``benchmarks/dag.py`` and
``tests/test_sweeps.py`` reuse the helpers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
EXPERIMENT_CONFIGS = ROOT / "config" / "experiments"

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- helpers


def snakemake(args, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake ARGS`` in ``cwd`` with this venv's bin first on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(SNAKEMAKE + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def mirror_workflow(dest: Path, root: Path = ROOT) -> Path:
    """A work directory that looks like the repository (symlinks) but has its own
    ``.snakemake`` and ``results``: every non-hidden top-level entry except results."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == "results":
            continue
        link = dest / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return dest


def common_args(results: Path, configfiles=(), config=()) -> list[str]:
    args = []
    if configfiles:
        args += ["--configfile", *map(str, configfiles)]
    return args + ["--config", f"results={results}", *config]


_JOB_HEAD = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_FIELD = re.compile(r"^    (\w+): (.*)$")
_WILDCARD = re.compile(r"(?:^|, )(\w+)=(.*?)(?=, \w+=|$)")


def planned_jobs(text: str) -> list[dict]:
    """The job blocks of a ``snakemake -n`` log: rule, wildcards, input, output, reason."""
    jobs, job = [], None
    for line in text.splitlines():
        head = _JOB_HEAD.match(line)
        if head:
            job = {"rule": head.group(1), "wildcards": {}, "input": [], "output": [], "reason": ""}
            jobs.append(job)
            continue
        field = _FIELD.match(line) if job is not None else None
        if field:
            key, value = field.groups()
            if key in ("input", "output"):
                job[key] = [p for p in value.split(", ") if p]
            elif key == "wildcards":
                job["wildcards"] = {k: v for k, v in _WILDCARD.findall(value)}
            elif key == "reason":
                job["reason"] = value
        elif job is not None and not line.startswith("    "):
            job = None
    return jobs


def job_key(job: dict) -> tuple[str, str]:
    """("score", "exp=gsm8k_gspo, policy=base"): readable in assertion diffs."""
    return job["rule"], ", ".join(f"{k}={v}" for k, v in sorted(job["wildcards"].items()))


def job_keys(jobs: list[dict]) -> set[tuple[str, str]]:
    return {job_key(j) for j in jobs}


def dry_run(workdir: Path, results: Path, configfiles=(), config=(), targets=(), extra=()):
    """``snakemake -n``; returns (completed process, planned jobs)."""
    args = ["-n", "--cores", "2", *extra, *common_args(results, configfiles, config)]
    if targets:
        args += ["--", *targets]
    out = snakemake(args, cwd=workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, planned_jobs(out.stdout + out.stderr)


def nothing_to_do(out: subprocess.CompletedProcess) -> bool:
    return "Nothing to be done" in out.stdout + out.stderr


def create_outputs(jobs: list[dict]) -> int:
    """Create every planned output: a folder when its name has no suffix (``directory()``
    outputs: models, warm starts, checkpoints, task splits), else an empty file."""
    n = 0
    for job in jobs:
        for out in job["output"]:
            p = Path(out)
            if p.suffix:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            else:
                p.mkdir(parents=True, exist_ok=True)
            n += 1
    return n


def mark_done(workdir: Path, results: Path, configfiles=(), config=()) -> list[dict]:
    """Mark the whole DAG as done without running a job; returns the jobs it marked.

    Outputs are created, then ``--touch --forceall`` gives them increasing mtimes in
    DAG order and records the metadata a real run records (it fails on missing outputs,
    hence the files first)."""
    _, jobs = dry_run(workdir, results, configfiles, config)
    create_outputs(jobs)
    out = snakemake(["--touch", "--forceall", "--cores", "2", *common_args(results, configfiles, config)], cwd=workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return jobs


# --------------------------------------------------------------------------- the default, marked done


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
        ("train_trl", exp),                    # the reward is part of the training spec
        ("generate", f"{exp}, policy=trained"),
        ("score", f"{exp}, policy=trained"),
        ("evaluate", exp),
        ("report", exp),
        ("summary", ""),
        ("all", ""),
    }
    # base responses, prompts and the warm start shared with gsm8k_grpo_lora stay as they are
    by_key = {job_key(j): j for j in planned}
    assert by_key[("score", f"{exp}, policy=base")]["reason"].startswith("Params have changed")
    assert by_key[("train_trl", exp)]["reason"].startswith("Params have changed")


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
        ("generate", f"{exp}, policy=trained"),
        ("score", f"{exp}, policy=base"),
        ("score", f"{exp}, policy=trained"),
        ("evaluate", exp),
        ("report", exp),
        ("summary", ""),
        ("all", ""),
    }


def test_named_experiment_config_plans_only_that_experiment(done):
    """``--configfile config/experiments/X.yaml`` next to a finished default: only X (and
    the summary, which now lists X only) is planned."""
    workdir, results, _ = done
    _, planned = dry_run(workdir, results, [EXPERIMENT_CONFIGS / "gsm8k_gspo_qwen3.yaml"])
    exp = "exp=gsm8k_gspo_qwen3"
    assert job_keys(planned) == {
        ("prepare_gsm8k", "dataset=gsm8k_hub"),
        ("make_prompts", exp),
        ("generate", f"{exp}, policy=base"),
        ("generate", f"{exp}, policy=trained"),
        ("score", f"{exp}, policy=base"),
        ("score", f"{exp}, policy=trained"),
        ("train_trl", exp),
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
