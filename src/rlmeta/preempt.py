"""Checkpoint-and-requeue on a signal: how a training job survives a SLURM time limit.

Inside a one-node SLURM job with a time limit, ``rlmeta launch`` stays as the parent of the training processes
and, ``--signal-before`` seconds (default 300, ``$RLMETA_SIGNAL_BEFORE``; at the latest half-way through the time
left) before the limit, sends SIGUSR1 to each of them (``rlmeta.launch.supervise``). Not ``sbatch --signal``:
the executor plugin runs the rule under an inner ``snakemake`` in an ``srun`` step, and SLURM's signal would
reach (and kill) that process as well, or, with ``B:``, the batch shell. Each trainer (TRL, FOMAML and its
baselines; MLX never runs there) holds a
``Preemption``: its handler only sets a flag; at the end of every optimizer step the ranks agree on it
(one all-reduce of a flag, so that every rank stops at the same step), write a checkpoint as they do every
``checkpoint_every`` steps, and leave: rank 0 asks SLURM to requeue the job (``scontrol requeue``) and every
rank exits with ``EXIT_REQUEUE``. The requeued job runs the rule again, which resumes from that checkpoint.
Outside SLURM the same signal writes the checkpoint and exits; running the step again resumes.

The processes ``rlmeta launch`` starts ignore SIGUSR1 (``torchrun``'s agent, the vLLM server) unless they
install a handler: only the trainers act on it. Each stop is appended to ``<checkpoints>/interruptions.jsonl``.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

SIGNAL = signal.SIGUSR1
EXIT_REQUEUE = 75
"""Exit status of a trainer that stopped on the signal after writing its checkpoint (EX_TEMPFAIL: try again)."""
INTERRUPTIONS = "interruptions.jsonl"
"""In the checkpoints folder: one JSON line per stop (step, checkpoint, time, SLURM job and restart count)."""


class Preemption:
    """The signal's flag, agreed on by every rank; a context manager around the training loop (main thread)."""

    def __init__(self, signum: int = SIGNAL):
        self.signum = signum
        self.received = False
        self.stopped_at: int | None = None

    def __enter__(self) -> Preemption:
        """Install the handler (main thread only); the previous one comes back on exit."""
        self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.signum, self._previous)

    def _handle(self, signum, frame) -> None:
        self.received = True
        print(f"rlmeta: {signal.Signals(signum).name}: writing a checkpoint at the end of this step, then "
              "exiting for a requeue", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """True on every rank when any rank received the signal (a collective: call it on all ranks)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step: int, checkpoint: str | os.PathLike, is_main: bool, env=None) -> None:
        """Leave after the checkpoint of ``step``: on rank 0 inside a SLURM job, ask for a requeue first."""
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID")
        if is_main:
            import json
            import time

            record = {"step": step, "checkpoint": str(checkpoint), "signal": signal.Signals(self.signum).name,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": job,
                      "slurm_restart_count": restart_count(job, env)}
            with open(os.path.join(os.path.dirname(os.fspath(checkpoint)), INTERRUPTIONS), "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if job:
                r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                outcome = "requeued" if r.returncode == 0 else f"requeue failed ({r.stderr.strip()})"
                log.warning("stopped at step %d on %s: %s written; SLURM job %s %s", step,
                            signal.Signals(self.signum).name, checkpoint, job, outcome)
            else:
                log.warning("stopped at step %d on %s: %s written; run the step again to resume", step,
                            signal.Signals(self.signum).name, checkpoint)
        raise SystemExit(EXIT_REQUEUE)


def restart_count(job: str | None, env=None) -> int | None:
    """How often SLURM has requeued this job: ``SLURM_RESTART_COUNT`` (0 when unset in the batch script), else
    ``scontrol show job``'s ``Restarts`` (the executor plugin's job steps do not pass the variable on)."""
    env = os.environ if env is None else env
    if not job:
        return None
    if env.get("SLURM_RESTART_COUNT", "").isdigit():
        return int(env["SLURM_RESTART_COUNT"])
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bRestarts=(\d+)", out)
    return int(m.group(1)) if m else None


def ignore_in_launcher() -> None:
    """Ignore the signal in ``rlmeta launch`` and, through exec, in what it starts (the dispositions of ignored
    signals are inherited): ``torchrun``'s agent would die of it, the trainers install their own handler."""
    signal.signal(SIGNAL, signal.SIG_IGN)
