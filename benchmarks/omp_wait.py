"""OpenMP wait policy: torch training steps per second of 2-thread processes, alone and two side by side.

Why the workflow's jobs (rules/common.smk) and the tests (tests/conftest.py) set OMP_WAIT_POLICY=PASSIVE
unless the user sets it: with libgomp's default, a thread that waits for work spins on its core, so two jobs
of two threads each on two cores (Snakemake running jobs side by side, or two test workers) steal each
other's cores and every step slows many-fold. PASSIVE threads sleep while they wait.

The loop is the project's typical CPU workload: small matrices (a 6-layer MLP of width 128, batch 32),
forward, backward and an SGD step, in a fresh process per measurement (the policy is read when libgomp
loads).

    .venv/bin/python benchmarks/omp_wait.py [--seconds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOOP = """
import sys, time, torch
torch.manual_seed(0)
m = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
x = torch.randn(32, 128)
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
for _ in range(20):  # warm-up: allocator, thread pool
    m(x).pow(2).mean().backward()
t, n = time.perf_counter(), 0
while time.perf_counter() - t < float(sys.argv[1]):
    loss = m(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step(); n += 1
print(n / (time.perf_counter() - t))
"""


def steps_per_second(policy: str | None, processes: int, seconds: float) -> list[float]:
    """Steps/s of each of ``processes`` 2-thread torch loops started together under ``policy`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "2"
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, "-c", LOOP, str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    a = p.parse_args()
    rows = {}
    for policy in (None, "PASSIVE"):
        for n in (1, 2):
            rates = steps_per_second(policy, n, a.seconds)
            rows[f"{policy or 'default'}_x{n}"] = round(sum(rates) / n, 1)
    print(f"{'OMP_WAIT_POLICY':<16}{'1 process':>12}{'2 side by side (each)':>24}")
    for policy in ("default", "PASSIVE"):
        print(f"{policy:<16}{rows[f'{policy}_x1']:>12.1f}{rows[f'{policy}_x2']:>24.1f}")
    rows["side_by_side_speedup"] = round(rows["PASSIVE_x2"] / max(rows["default_x2"], 1e-9), 1)
    rows["cores"] = os.cpu_count()
    print(json.dumps({"benchmark": "omp_wait", "unit": "steps/s", **rows}))


if __name__ == "__main__":
    main()
