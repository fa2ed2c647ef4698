"""``rlmeta status``: what Snakemake would run, and why, in one line per job.

Runs ``snakemake --dry-run`` with the given arguments and reads each planned job's reason. A
params change is told apart: a changed ``code`` param (``rlmeta.provenance.code_fingerprint``)
names the modules whose source changed since the job last ran; other params changes name the
config blocks that differ.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

_JOB_HEAD = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_FIELD = re.compile(r"^    (\w+): (.*)$")
_WILDCARD = re.compile(r"(?:^|, )(\w+)=(.*?)(?=, \w+=|$)")
_MODULE = re.compile(r"(\w+(?:\.\w+)*)@([0-9a-f]{8})")  # rlmeta modules and reward plugins


def planned_jobs(text: str) -> list[dict]:
    """The job blocks of a ``snakemake -n`` log: rule, wildcards, input, output, benchmark, reason."""
    jobs, job = [], None
    for line in text.splitlines():
        head = _JOB_HEAD.match(line)
        if head:
            job = {"rule": head.group(1), "wildcards": {}, "input": [], "output": [], "benchmark": None, "reason": ""}
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
            elif key == "benchmark":
                job["benchmark"] = value
        elif job is not None and not line.startswith("    "):
            job = None
    return jobs


def changed_modules(reason: str) -> list[str]:
    """Modules whose source hash differs between the recorded and the current code param of a job."""
    if "Params have changed" not in reason or " now: " not in reason:
        return []
    before, now = reason.split(" now: ", 1)
    old, new = dict(_MODULE.findall(before)), dict(_MODULE.findall(now))
    return sorted(m for m in set(old) | set(new) if old.get(m) != new.get(m))


_SHORT = {"Missing output files": "outputs missing", "Input files updated by another job": "inputs remade upstream",
          "Updated input files": "inputs newer than outputs", "Code has changed since last execution": "rule changed",
          "Set of input files has changed since last execution": "set of inputs changed",
          "Software environment definition has changed since last execution": "conda environment changed",
          "Forced execution": "forced"}


def _short(part: str) -> str:
    head = part.split(":", 1)[0].strip()
    return _SHORT.get(head, part)


def explain(job: dict) -> str:
    """One line: the job and why it would run."""
    wc = ", ".join(f"{k}={v}" for k, v in sorted(job["wildcards"].items()))
    reason = job["reason"]
    modules = changed_modules(reason)
    if modules:
        why = "code changed: " + ", ".join(modules)
        rest = _MODULE.sub("", reason)
        if re.search(r"before: [^<]*[{\[\"]", rest):
            why += " (and config params)"
    elif "Params have changed" in reason:
        why = "config params changed"
    else:
        why = "; ".join(_short(part) for part in reason.split("; "))
    return f"{job['rule']}{f' ({wc})' if wc else ''}: {why}"


def command(p: argparse.ArgumentParser):
    """``rlmeta status [snakemake options and targets]``."""
    p.epilog = "Every other option and target goes to `snakemake --dry-run` (e.g. --configfile my.yaml)."

    def run(a):
        args = a.extra
        out = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "1", *args],
                             capture_output=True, text=True)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
            from rlmeta.errors import UserError

            raise UserError(f"snakemake --dry-run failed: {' '.join(tail)}")
        jobs = planned_jobs(out.stdout + out.stderr)
        for job in jobs:
            print(explain(job))
        print(f"{len(jobs)} job(s) would run" if jobs else "nothing to do: every output is up to date")
    run.passthrough = True
    return run
