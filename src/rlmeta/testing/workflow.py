"""Snakemake runs for the tests and benchmarks: a mirrored work directory, dry runs parsed into jobs,
and a workflow marked as done without running it (see tests/test_reruns.py for what they check)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from rlmeta.settings import ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
EXPERIMENT_CONFIGS = ROOT / "config" / "experiments"


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
