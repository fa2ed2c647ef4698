"""Build and run the ``torchrun`` command of a distributed training rule.

One node (laptop, workstation, or one SLURM node)::

    torchrun --standalone --nproc_per_node=N script args...

Several SLURM nodes (the rule runs once on the job's first node, because the
slurm profile gives it ``mpi: "srun"`` so the executor plugin does not wrap it
in ``srun`` itself; this command starts one ``torchrun`` per node, and the
``torchrun`` agents meet through the c10d rendezvous on the first node)::

    srun --nodes=M --ntasks-per-node=1 torchrun --nnodes=M --nproc_per_node=N \\
        --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d \\
        --rdzv_endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):PORT \\
        script args...

A Snakemake rule calls the CLI with an ``rlmeta`` step (run as ``-m rlmeta <step>``) or a script::

    python -m rlmeta launch --nproc {resources.gpu} --nodes {resources.nodes} \\
        --cpu-procs 2 -- train-fomaml --meta ... --out {output}

``--nproc`` is the GPU count of the whole job, i.e. the rule's ``resources.gpu``,
which the SLURM executor plugin requests as ``sbatch --gpus=N`` (per job); every
node runs ``nproc / nodes`` workers (torchrun's ``--nproc_per_node``).  With one
node the two are the same.  When it is 0 (the CPU profiles set ``gpu=0``) each
node runs ``--cpu-procs`` workers and the script is expected to pick the gloo
backend.  ``--nproc auto`` uses the GPUs this process can see
(CUDA_VISIBLE_DEVICES / SLURM_GPUS_ON_NODE) per node.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmeta.preempt import ignore_in_launcher

DEFAULT_PORT = 29500
SIGNAL_BEFORE_ENV = "RLMETA_SIGNAL_BEFORE"
DEFAULT_SIGNAL_BEFORE = 300.0
"""Seconds before a SLURM job's time limit at which the launcher signals its trainers (rlmeta.preempt)."""
RESEND_S = 10.0
"""After the first pre-timeout signal, the launcher repeats it this often until its command ends."""
#: Shell expression (evaluated on the job's first node) giving the rendezvous host.
HEAD_NODE_EXPR = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'

__all__ = [
    "DEFAULT_PORT",
    "HEAD_NODE_EXPR",
    "torchrun_command",
    "gpus_from_env",
    "parse_time_left",
    "signal_wait",
    "slurm_time_left",
    "supervise",
    "nproc_for",
    "resolve_torchrun",
    "resolve_trl",
    "split_gpus",
    "vllm_server_command",
    "default_port",
    "command",
]


def torchrun_command(
    script: str,
    args: Sequence[str] = (),
    nproc: int = 1,
    nodes: int = 1,
    port: int = DEFAULT_PORT,
    *,
    srun: bool | None = None,
    cpus_per_task: int | None = None,
    torchrun: str = "torchrun",
    module: bool = False,
) -> str:
    """The shell command line that starts ``script`` (a module with ``module=True``) under torchrun.

    ``nproc`` is the number of worker processes per node, ``nodes`` the number
    of nodes.  With ``nodes == 1`` the command is a standalone (single-node)
    torchrun; with ``nodes > 1`` (or ``srun=True``) it is an ``srun`` that starts
    one torchrun agent per node with a c10d rendezvous on the allocation's first
    node.  That form must run inside a SLURM allocation, through a shell
    (it uses ``$SLURM_JOB_ID`` and ``$(scontrol ...)``).  ``cpus_per_task``, when
    given, is passed to that ``srun`` (since SLURM 22.05 ``srun`` does not
    inherit ``--cpus-per-task`` from ``sbatch``).  ``torchrun`` is the launcher
    word(s) as written into the command (not quoted: it may be
    ``"python -m torch.distributed.run"``).  ``script`` and ``args`` are
    shell-quoted.
    """
    nproc = _positive_int(nproc, "nproc")
    nodes = _positive_int(nodes, "nodes")
    port = _positive_int(port, "port")
    if srun is None:
        srun = nodes > 1
    tail = ("-m " if module else "") + " ".join(shlex.quote(str(a)) for a in [script, *args])
    if not srun:
        if nodes > 1:
            raise ValueError("a multi-node launch needs srun (srun=False with nodes > 1)")
        return f"{torchrun} --standalone --nproc_per_node={nproc} {tail}"
    srun_opts = f"--nodes={nodes} --ntasks-per-node=1"
    if cpus_per_task is not None:
        srun_opts += f" --cpus-per-task={_positive_int(cpus_per_task, 'cpus_per_task')}"
    return (
        f"srun {srun_opts} {torchrun} --nnodes={nodes} --nproc_per_node={nproc} "
        f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
        f"--rdzv_endpoint={HEAD_NODE_EXPR}:{port} {tail}"
    )


def vllm_server_command(model: str, gpus: Sequence[str], tensor_parallel: int = 1, port: int = 8000,
                        max_model_len: int | None = None, trl: str = "trl") -> str:
    """Shell words that start TRL's vLLM server (``trl vllm-serve``) on ``gpus`` (CUDA device ids) in the
    background and stop it when the shell exits; the training command follows them.

    ``len(gpus) / tensor_parallel`` data-parallel engines of ``tensor_parallel`` GPUs each; the trainer
    (``vllm_mode="server"``) waits until the server answers, then sends it prompts and weight updates.
    """
    tensor_parallel = _positive_int(tensor_parallel, "tensor_parallel")
    if not gpus or len(gpus) % tensor_parallel:
        raise ValueError(f"{len(gpus)} server GPUs are not a multiple of tensor_parallel {tensor_parallel}")
    extra = f" --max-model-len {_positive_int(max_model_len, 'max_model_len')}" if max_model_len else ""
    return (f"CUDA_VISIBLE_DEVICES={','.join(gpus)} {trl} vllm-serve --model {shlex.quote(str(model))} "
            f"--tensor-parallel-size {tensor_parallel} --data-parallel-size {len(gpus) // tensor_parallel} "
            f"--host 127.0.0.1 --port {_positive_int(port, 'port')}{extra} & "
            "vllm_pid=$!; trap 'kill $vllm_pid 2>/dev/null' EXIT; ")


def split_gpus(n_serve: int, n_train: int, env: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(serving, training) CUDA device ids: the first ``n_serve`` visible GPUs serve, the next ``n_train`` train.

    The visible ids are ``CUDA_VISIBLE_DEVICES`` (SLURM sets it to the job's GPUs), else 0, 1, ...
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    visible = ([d.strip() for d in cvd.split(",") if d.strip()] if cvd is not None
               else [str(i) for i in range(n_serve + n_train)])
    if len(visible) < n_serve + n_train:
        raise ValueError(f"vLLM server mode needs {n_serve} serving + {n_train} training GPUs, "
                         f"{len(visible)} visible (CUDA_VISIBLE_DEVICES={cvd!r})")
    return visible[:n_serve], visible[n_serve:n_serve + n_train]


def resolve_trl() -> str:
    """The ``trl`` command of the running Python's environment, as shell words."""
    sibling = Path(sys.executable).with_name("trl")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return shlex.quote(str(sibling))
    return shlex.quote(shutil.which("trl") or "trl")


def parse_time_left(text: str) -> float | None:
    """Seconds in squeue's ``%L`` (``[D-]H:MM:SS``, ``M:SS``), None for ``UNLIMITED``, ``NOT_SET`` or unreadable."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not 1 <= len(parts) <= 3 or not all(x.isdigit() for x in parts) or (days and not days.isdigit()):
        return None
    seconds = 0
    for x in parts:
        seconds = seconds * 60 + int(x)
    return float(seconds + 86400 * int(days or 0))


def slurm_time_left(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds before this SLURM job's time limit (squeue ``%L``), None outside SLURM or without a limit."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_time_left(out.stdout) if out.returncode == 0 else None


def signal_wait(left: float, before: float) -> float:
    """Seconds from now to the pre-timeout signal: ``before`` seconds before the limit, ``left`` seconds away, but
    never in the first half of the time left (a job shorter than ``before`` must progress before it stops)."""
    return max(left - before, left / 2)


def supervise(cmd: str, env: dict[str, str], signal_at: float | None, early: Sequence[int] = ()) -> int:
    """Run ``cmd`` (bash) and wait; from ``signal_at`` (a ``time.monotonic()`` value) on, or when this process
    gets SIGUSR1, send SIGUSR1 to every process under it (torchrun starts its workers in sessions of their own,
    so a process-group signal would miss them), again every ``RESEND_S`` seconds until the command ends: a
    trainer still loading its model ignores it (it installs its handler when training starts). The children
    ignore it unless they handle it (the trainers do: ``rlmeta.preempt``). ``early``: signals the caller's
    provisional handler caught before this one was installed: then the signals start at once. Returns the
    command's exit status."""
    import signal
    import time

    import psutil

    child = subprocess.Popen(["bash", "-c", cmd], env=env, preexec_fn=ignore_in_launcher)

    def notify(*_):
        tree = psutil.Process(child.pid).children(recursive=True) + [psutil.Process(child.pid)]
        print(f"rlmeta launch: SIGUSR1 to {len(tree)} processes (checkpoint and exit)", file=sys.stderr, flush=True)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, notify)
    if early:  # the time has come: signal now, and again every RESEND_S (the trainers are still starting)
        signal_at = time.monotonic()
    while True:
        wait = None if signal_at is None else max(0.0, signal_at - time.monotonic())
        try:
            return child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            signal_at = time.monotonic() + RESEND_S
            notify()


def gpus_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """GPUs visible to this process according to the environment, or None if unknown.

    ``CUDA_VISIBLE_DEVICES`` wins (SLURM sets it for the GPUs it allocated on this
    node; an empty value or ``NoDevFiles`` means none), then
    ``SLURM_GPUS_ON_NODE``.  Nothing is imported (no torch), so this also works
    on machines without CUDA.
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        cvd = cvd.strip()
        if cvd in ("", "NoDevFiles") or cvd.startswith("-1"):
            return 0
        return len([d for d in cvd.split(",") if d.strip()])
    on_node = env.get("SLURM_GPUS_ON_NODE")
    if on_node is not None and on_node.strip().isdigit():
        return int(on_node)
    return None


def nproc_for(resources: Any, cpu_procs: int = 1) -> int:
    """Processes per node for a rule's resources: its ``gpu`` count, or ``cpu_procs`` when 0.

    ``resources`` is a mapping or an object with attributes (Snakemake's
    ``resources``); a missing ``gpu`` counts as 0.
    """
    if isinstance(resources, Mapping):
        gpu = resources.get("gpu", 0)
    else:
        gpu = getattr(resources, "gpu", 0)
    gpu = int(gpu or 0)
    if gpu < 0:
        raise ValueError(f"gpu must be >= 0, got {gpu}")
    return gpu if gpu > 0 else _positive_int(cpu_procs, "cpu_procs")


def resolve_torchrun() -> str:
    """The torchrun launcher that belongs to the running Python, as shell words."""
    sibling = Path(sys.executable).with_name("torchrun")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return shlex.quote(str(sibling))
    found = shutil.which("torchrun")
    if found:
        return shlex.quote(found)
    return f"{shlex.quote(sys.executable)} -m torch.distributed.run"


def _positive_int(value: Any, name: str) -> int:
    try:
        ivalue = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if ivalue != value and str(ivalue) != str(value).strip():
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if ivalue < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return ivalue


def _slurm_env_for_srun(env: dict[str, str]) -> dict[str, str]:
    """Make sure ``SLURM_JOB_NODELIST`` is set for the rendezvous host lookup.

    The SLURM jobstep executor starts rules with a scrubbed environment that
    keeps ``SLURM_JOB_ID`` but drops ``SLURM_JOB_NODELIST``; ask the controller.
    """
    if env.get("SLURM_JOB_NODELIST"):
        return env
    if not env.get("SLURM_JOB_ID"):
        raise SystemExit(
            "rlmeta launch: a multi-node (srun) launch must run inside a SLURM job "
            "(SLURM_JOB_ID is not set); use --nodes 1 outside SLURM"
        )
    nodelist = env.get("SLURM_NODELIST", "")
    if not nodelist:
        try:
            nodelist = subprocess.run(
                ["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%N"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"rlmeta launch: cannot find the job's node list: {exc}") from None
    env = dict(env)
    env["SLURM_JOB_NODELIST"] = nodelist
    return env


def default_port(env: Mapping[str, str] | None = None) -> int:
    """Rendezvous port: $RLMETA_TORCHRUN_PORT, else one per SLURM job, else DEFAULT_PORT.

    Two multi-node jobs whose first node is the same machine would otherwise both
    try to open the c10d store on 29500.
    """
    env = os.environ if env is None else env
    if env.get("RLMETA_TORCHRUN_PORT"):
        return int(env["RLMETA_TORCHRUN_PORT"])
    job = env.get("SLURM_JOB_ID", "")
    return DEFAULT_PORT + int(job) % 1000 if job.isdigit() else DEFAULT_PORT


def _parse_nproc(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nproc must be an integer >= 0 or 'auto', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--nproc must be >= 0, got {n}")
    return n


def command(p: argparse.ArgumentParser):
    """``rlmeta launch``: run an rlmeta step (or a script) under torchrun, or srun + torchrun on SLURM."""
    from rlmeta.cli import STEPS

    p.epilog = ("Example: rlmeta launch --nproc {resources.gpu} --nodes {resources.nodes} -- train-fomaml --out m/\n"
                "A target that names an rlmeta step runs as `-m rlmeta <step>`; a path runs as a script.")
    p.add_argument("--nproc", type=_parse_nproc, default="auto",
                   help="GPUs (worker processes) of the whole job, i.e. resources.gpu; each node "
                        "runs nproc/nodes. 0 = CPU run (--cpu-procs per node); "
                        "'auto' = the GPUs visible here, per node (default)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--cpu-procs", type=int, default=1,
                   help="processes per node when --nproc is 0 or no GPU is visible (default 1)")
    p.add_argument("--port", type=int, default=None,
                   help="c10d rendezvous port of the srun form (default: $RLMETA_TORCHRUN_PORT, else "
                        f"{DEFAULT_PORT} + SLURM_JOB_ID mod 1000 inside a SLURM job, else {DEFAULT_PORT})")
    p.add_argument("--srun", action="store_true", help="use the srun + c10d rendezvous form even for one node")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="passed to srun in the multi-node form (the rule's resources.cpus_per_task)")
    p.add_argument("--torchrun", default=None,
                   help="launcher to use (default: torchrun next to this Python, else on PATH, "
                        "else 'python -m torch.distributed.run')")
    p.add_argument("--direct-if-one", action="store_true",
                   help="one process on one node: run the step itself, without torchrun (no process group, "
                        "the same run as calling the step by hand)")
    p.add_argument("--vllm-serve-gpus", type=int, default=0,
                   help="start TRL's vLLM server (trl vllm-serve) on this many GPUs of the job first; --nproc "
                        "then counts the training processes only, on the GPUs after them (one node; default 0)")
    p.add_argument("--vllm-model", default=None, help="the model folder the vLLM server loads (with --vllm-serve-gpus)")
    p.add_argument("--vllm-tensor-parallel", type=int, default=1, help="GPUs per vLLM engine (default 1)")
    p.add_argument("--vllm-port", type=int, default=8000, help="the vLLM server's port (default 8000)")
    p.add_argument("--vllm-max-model-len", type=int, default=None, help="the vLLM engine's context length")
    p.add_argument("--trl", default=None, help="the trl command of --vllm-serve-gpus (default: next to this Python, "
                                                "else on PATH)")
    p.add_argument("--signal-before", type=float, default=None,
                   help="inside a one-node SLURM job with a time limit: stay as the command's parent and send SIGUSR1 "
                        "to its processes this many seconds before the limit (at the latest half-way through the "
                        "time left), so that the trainers checkpoint and exit for a requeue (default: "
                        f"${SIGNAL_BEFORE_ENV}, else {DEFAULT_SIGNAL_BEFORE:g}; 0 = off)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("target", help="an rlmeta step (e.g. train-fomaml) or a script path (put it after --)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the step or script")

    def run(ns):
        args = list(ns.args)
        if args and args[0] == "--":
            args = args[1:]
        if ns.nodes < 1:
            p.error("--nodes must be >= 1")
        if ns.cpu_procs < 1:
            p.error("--cpu-procs must be >= 1")
        if ns.vllm_serve_gpus and ns.nodes > 1:
            p.error("--vllm-serve-gpus: the vLLM server mode runs on one node (--nodes 1)")
        if ns.vllm_serve_gpus and not ns.vllm_model:
            p.error("--vllm-serve-gpus needs --vllm-model (the folder the server loads)")
        if ns.nproc == "auto":
            nproc = max(1, (gpus_from_env() or 0) - ns.vllm_serve_gpus) if ns.vllm_serve_gpus else (
                gpus_from_env() or ns.cpu_procs)
        elif ns.nproc == 0:
            nproc = ns.cpu_procs
        elif ns.nproc % ns.nodes:
            p.error(f"--nproc {ns.nproc} (GPUs of the job) is not a multiple of --nodes {ns.nodes}")
        else:
            nproc = ns.nproc // ns.nodes
        step = ns.target in STEPS
        target, args = ("rlmeta", [ns.target, *args]) if step else (ns.target, args)
        use_srun = ns.srun or ns.nodes > 1
        if ns.direct_if_one and nproc == 1 and ns.nodes == 1:
            cmd = " ".join(shlex.quote(a) for a in [sys.executable, *(["-m"] if step else []), target, *args])
            if use_srun:  # --srun: a step of its own
                cpus = ns.cpus_per_task and f" --cpus-per-task={_positive_int(ns.cpus_per_task, 'cpus_per_task')}"
                cmd = f"srun --nodes=1 --ntasks-per-node=1{cpus or ''} {cmd}"
        else:
            cmd = torchrun_command(target, args, nproc=nproc, nodes=ns.nodes, port=ns.port or default_port(),
                                   srun=use_srun, cpus_per_task=ns.cpus_per_task if use_srun else None,
                                   torchrun=ns.torchrun or resolve_torchrun(), module=step)
        if ns.vllm_serve_gpus:
            try:
                serve, train = split_gpus(ns.vllm_serve_gpus, nproc)
                cmd = (vllm_server_command(ns.vllm_model, serve, ns.vllm_tensor_parallel, ns.vllm_port,
                                           ns.vllm_max_model_len, trl=ns.trl or resolve_trl())
                       + f"CUDA_VISIBLE_DEVICES={','.join(train)} {cmd}")
            except ValueError as e:
                p.error(str(e))
        if ns.dry_run:
            print(cmd)
            return 0
        print(f"rlmeta launch: {cmd}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        if use_srun:
            env = _slurm_env_for_srun(env)
        before = ns.signal_before
        if before is None:
            try:
                before = float(env.get(SIGNAL_BEFORE_ENV) or DEFAULT_SIGNAL_BEFORE)
            except ValueError:
                p.error(f"${SIGNAL_BEFORE_ENV} must be a number of seconds, got {env[SIGNAL_BEFORE_ENV]!r}")
        # a one-node job with a time limit: signal the trainers before it. Not the srun form (several nodes): its
        # torchrun agents are srun's tasks, which a forwarded SIGUSR1 would kill; there the periodic checkpoints
        # and slurm-requeue resume
        supervised = before > 0 and not use_srun and bool(env.get("SLURM_JOB_ID"))
        early: list[int] = []
        if supervised:
            import signal

            # from here on SIGUSR1 means "checkpoint and exit", not the default "terminate the launcher": one that
            # comes before supervise() has started the command is kept and passed on as soon as it has
            signal.signal(signal.SIGUSR1, lambda signum, _frame: early.append(signum))
        left = slurm_time_left(env) if supervised else None
        if left is not None:
            import time

            wait = signal_wait(left, before)
            print(f"rlmeta launch: {left:.0f} s left in SLURM job {env['SLURM_JOB_ID']}: SIGUSR1 to the trainers "
                  f"in {wait:.0f} s", file=sys.stderr, flush=True)
            return supervise(cmd, env, time.monotonic() + wait, early=early)
        ignore_in_launcher()  # inherited through exec: torchrun's agent ignores it, the trainers handle it
        os.execvpe("bash", ["bash", "-c", cmd], env)
        return 127  # not reached
    return run
