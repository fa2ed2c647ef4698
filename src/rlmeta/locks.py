"""Stale Snakemake locks: remove them when no Snakemake process is still using the work directory.

A Snakemake run that is killed (SIGKILL, a lost login session, a requeued SLURM head job) leaves its
lock in ``.snakemake/locks/``, and the next run refuses to start until someone types
``snakemake --unlock``. ``rlmeta unlock`` does that unattended, but only when it is safe: no other
``snakemake`` process, nor an ``rlmeta`` step it started, has this directory as its working directory
(Linux: ``/proc``; elsewhere: no ``snakemake`` process at all). ``make run`` calls it before Snakemake.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def lock_files(workdir: str | Path) -> list[Path]:
    """The lock files Snakemake left in ``workdir``."""
    locks = Path(workdir) / ".snakemake" / "locks"
    return sorted(p for p in locks.iterdir() if p.is_file()) if locks.is_dir() else []


def _is_workflow_process(cmdline: list[str]) -> bool:
    """A Snakemake, or a job it started: ``rlmeta <step>`` (also under torchrun), except ``rlmeta unlock``."""
    head = [Path(a).name for a in cmdline[:8]]
    if "snakemake" in head[:3]:
        return True
    if "rlmeta" in head:
        step = head[head.index("rlmeta") + 1:head.index("rlmeta") + 2]
        return step != ["unlock"]
    return False


def snakemake_processes(workdir: str | Path) -> list[int]:
    """PIDs of other running Snakemake processes, or ``rlmeta`` steps (jobs that may outlive their Snakemake,
    e.g. torchrun workers), whose working directory is ``workdir`` (on Linux); elsewhere the PIDs of every
    Snakemake process (the safe answer)."""
    workdir = Path(workdir).resolve()
    proc, me = Path("/proc"), os.getpid()
    if not proc.is_dir():
        out = subprocess.run(["pgrep", "-f", "snakemake"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != me]
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in (me, os.getppid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if _is_workflow_process(cmdline) and Path(os.readlink(entry / "cwd")).resolve() == workdir:
                found.append(int(entry.name))
        except OSError:  # the process ended, or is not ours to read
            continue
    return sorted(found)


def unlock_if_stale(workdir: str | Path = ".") -> str:
    """Remove Snakemake's locks in ``workdir`` when no Snakemake uses it; returns what was done.

    The lock files are deleted directly, as ``snakemake --unlock`` does with the default (file system)
    persistence, so the workflow need not be parsed."""
    locks = lock_files(workdir)
    if not locks:
        return "no lock"
    running = snakemake_processes(workdir)
    if running:
        return f"in use by running Snakemake or rlmeta process(es) {', '.join(map(str, running))}: left alone"
    for lock in locks:
        lock.unlink(missing_ok=True)
    where = Path(workdir).resolve()
    return f"removed {len(locks)} stale lock file(s) (no Snakemake or rlmeta process was using {where})"


def command(p: argparse.ArgumentParser):
    """``rlmeta unlock``: remove a killed run's Snakemake locks, if no Snakemake still uses the directory."""
    p.add_argument("--directory", default=".", help="the Snakemake work directory (default: here)")

    def run(a):
        print(f"rlmeta unlock: {unlock_if_stale(a.directory)}", file=sys.stderr)
    return run
