"""Snakemake runs for the tests and benchmarks: a mirrored work directory, dry runs parsed into jobs,
and a workflow marked as done without running it (see tests/test_reruns.py for what they check)."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rlmeta.settings import ROOT
from rlmeta.status import planned_jobs

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
EXPERIMENT_CONFIGS = ROOT / "config" / "experiments"


# --------------------------------------------------------------------------- helpers


SLURM_CLIENTS = ("sinfo", "squeue", "sacct", "scontrol", "sbatch", "srun", "scancel", "salloc", "sacctmgr", "sstat")
"""SLURM's client tools, hidden from the Snakemake runs of tests that do not use a cluster."""


def _hidden_slurm(directory: str) -> str:
    """``directory``, or where it holds SLURM's client tools, a folder of symlinks to all its other entries.

    The SLURM executor plugin runs ``scontrol show config`` (10 s timeout) whenever Snakemake starts on a
    machine with ``sinfo`` on PATH, and with no controller answering each start waits about 9 s. Tests
    that do not use the cluster hide the tools instead (tests/test_slurm.py keeps them)."""
    d = Path(directory)
    if not any((d / tool).exists() for tool in SLURM_CLIENTS):
        return directory
    names = sorted(n for n in os.listdir(d) if n not in SLURM_CLIENTS)
    key = hashlib.sha256("\0".join([str(d.resolve()), *names]).encode()).hexdigest()[:16]
    farm = Path(tempfile.gettempdir()) / f"rlmeta-no-slurm-{os.getuid()}" / key
    if not farm.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".farm-", dir=farm.parent.mkdir(parents=True, exist_ok=True) or farm.parent))
        for n in names:
            (tmp / n).symlink_to(d / n)
        try:
            tmp.rename(farm)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(farm)


def path_without_slurm(path: str | None = None) -> str:
    """A PATH (default: this process's) on which no SLURM client tool is found."""
    return ":".join(_hidden_slurm(p) for p in (path if path is not None else os.environ["PATH"]).split(":") if p)


def snakemake_env(**extra: str) -> dict:
    """The environment of a test's Snakemake: this venv's bin first on PATH, SLURM's tools hidden."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{path_without_slurm()}", **extra)


def snakemake(args, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake ARGS`` in ``cwd`` with this venv's bin first on PATH (``snakemake_env``)."""
    env = snakemake_env()
    return subprocess.run(SNAKEMAKE + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


@functools.cache
def default_seeds(exp: str) -> tuple[int, ...]:
    """The default config's training seeds of RL experiment ``exp`` (``seeds``, else the workflow's seed), as the
    rules take them."""
    from rlmeta.settings import load_config

    cfg = load_config(ROOT / "config" / "config.yaml")
    return tuple(cfg.experiments[exp].run_seeds(cfg.seed))


def mirror_workflow(dest: Path, root: Path = ROOT, copy=()) -> Path:
    """A work directory that looks like the repository (symlinks) but has its own
    ``.snakemake`` and ``results``: every non-hidden top-level entry except results. Entries named in
    ``copy`` (e.g. ``src``) are copied instead, so a test can edit them."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name == "results":
            continue
        link = dest / entry.name
        if entry.name in copy:
            shutil.copytree(entry, link, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif not link.exists():
            link.symlink_to(entry)
    return dest


def common_args(results: Path, configfiles=(), config=()) -> list[str]:
    args = []
    if configfiles:
        args += ["--configfile", *map(str, configfiles)]
    return args + ["--config", f"results={results}", *config]


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
    outputs: models, warm starts, checkpoints, task splits), else an empty file; and the job's
    benchmark file (Snakemake counts it as an output)."""
    n = 0
    for job in jobs:
        for out in job["output"] + ([job["benchmark"]] if job.get("benchmark") else []):
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
