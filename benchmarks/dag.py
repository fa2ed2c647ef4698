"""How long Snakemake takes to plan the workflow: a 200-point sweep, and an up-to-date re-run.

Cases (each in a temporary copy of the workflow, with a temporary results folder):

- ``default_dryrun``: ``snakemake -n`` of the embedded default, nothing built yet (50 jobs);
- ``sweep200_dryrun``: ``snakemake -n`` of the default plus a 20 learning rates x 10
  temperatures sweep over gsm8k_grpo_lora (205 experiments, about 1650 jobs);
- ``uptodate_rerun``: ``snakemake --cores 2`` (a real run, not a dry run) of the default
  after every output exists and every job's metadata is recorded (marked done with
  ``--touch --forceall``, ``rlmeta.testing.workflow.mark_done``); it must say "Nothing to be done";
- ``uptodate_dryrun``: ``snakemake -n`` of the same.

Wall seconds are the median of ``--repeat`` runs; CPU seconds (user + system of the
Snakemake process) show how much of the wall time was waiting for a busy machine. The default
is one run per case (about 2-3 minutes in all on a 2-core machine, for ``make bench``); the figures
in docs/benchmarks.md are medians of ``--repeat 3``.

    python benchmarks/dag.py [--repeat 1] [--lrs 20 --temps 10]

The last line printed is one JSON object with ``sweep200_dryrun_s`` and ``uptodate_rerun_s``.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.testing.workflow import common_args, mark_done, mirror_workflow, snakemake


def sweep_yaml(lrs: int, temps: int) -> str:
    lr = [round(1e-4 * (i + 1), 6) for i in range(lrs)]
    temp = [round(0.5 + 0.1 * i, 2) for i in range(temps)]
    return ("sweeps:\n  grid200:\n    experiment: gsm8k_grpo_lora\n    grid:\n"
            f"      train.learning_rate: {json.dumps(lr)}\n      train.temperature: {json.dumps(temp)}\n")


def timed(args, cwd: Path) -> tuple[float, float, str]:
    """(wall s, child CPU s, log) of one snakemake call; fails loudly if snakemake fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = snakemake(args, cwd=cwd, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall, cpu, out.stdout + out.stderr


def total_jobs(log: str) -> int:
    m = re.search(r"^total\s+(\d+)$", log, re.M)
    return int(m.group(1)) if m else 0


def measure(name: str, args, cwd: Path, repeat: int, check=None) -> dict:
    walls, cpus, log = [], [], ""
    for _ in range(repeat):
        wall, cpu, log = timed(args, cwd)
        if check:
            check(log)
        walls.append(wall)
        cpus.append(cpu)
    row = {"case": name, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
           "runs": repeat, "jobs": total_jobs(log)}
    print(f"  {name}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU, {row['jobs']} jobs", file=sys.stderr)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1, help="runs per case (median reported)")
    p.add_argument("--lrs", type=int, default=20)
    p.add_argument("--temps", type=int, default=10)
    ns = p.parse_args()

    def up_to_date(log: str) -> None:
        if "Nothing to be done" not in log:
            raise SystemExit("the marked-done default is not up to date:\n" + log[-3000:])

    with tempfile.TemporaryDirectory(prefix="rlmeta-dag-") as tmp:
        tmp = Path(tmp)
        wf = mirror_workflow(tmp / "wf")
        sweep = tmp / "sweep.yaml"
        sweep.write_text(sweep_yaml(ns.lrs, ns.temps))
        points = ns.lrs * ns.temps
        rows = [
            measure("default_dryrun", ["-n", "--cores", "2", *common_args(tmp / "fresh")], wf, ns.repeat),
            measure(f"sweep{points}_dryrun", ["-n", "--cores", "2", *common_args(tmp / "sweep", [sweep])], wf,
                    ns.repeat),
        ]
        t0 = time.perf_counter()
        mark_done(wf, tmp / "done")
        print(f"  (marking the default done took {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        rows.append(measure("uptodate_rerun", ["--cores", "2", *common_args(tmp / "done")], wf, ns.repeat,
                            check=up_to_date))
        rows.append(measure("uptodate_dryrun", ["-n", "--cores", "2", *common_args(tmp / "done")], wf, ns.repeat))

    print()
    print(f"{'case':<20} {'jobs':>6} {'wall s':>8} {'CPU s':>8} {'runs':>5}")
    print("-" * 51)
    for r in rows:
        print(f"{r['case']:<20} {r['jobs']:>6} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['runs']:>5}")
    by = {r["case"]: r for r in rows}
    result = {
        f"sweep{points}_dryrun_s": round(by[f"sweep{points}_dryrun"]["wall_s"], 2),
        "uptodate_rerun_s": round(by["uptodate_rerun"]["wall_s"], 2),
        f"sweep{points}_dryrun_cpu_s": round(by[f"sweep{points}_dryrun"]["cpu_s"], 2),
        "uptodate_rerun_cpu_s": round(by["uptodate_rerun"]["cpu_s"], 2),
        "default_dryrun_s": round(by["default_dryrun"]["wall_s"], 2),
        "uptodate_dryrun_s": round(by["uptodate_dryrun"]["wall_s"], 2),
        f"sweep{points}_jobs": by[f"sweep{points}_dryrun"]["jobs"],
        "repeat": ns.repeat,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
