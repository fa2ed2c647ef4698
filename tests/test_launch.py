"""rlmeta launch: the exact torchrun / srun command lines, and the CLI a rule calls."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlmeta.cli import main
from rlmeta.launch import HEAD_NODE_EXPR, default_port, gpus_from_env, nproc_for, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
ALLREDUCE = ROOT / "tests" / "fixtures" / "slurm_wf" / "allreduce.py"


def test_single_node_command():
    assert torchrun_command("scripts/train_fomaml.py", ["--config", "c.yaml", "--out", "results/x"], nproc=4) == (
        "torchrun --standalone --nproc_per_node=4 scripts/train_fomaml.py --config c.yaml --out results/x")


def test_single_node_quotes_arguments():
    cmd = torchrun_command("my script.py", ["a b", "$HOME", "it's"], nproc=1)
    assert cmd == "torchrun --standalone --nproc_per_node=1 'my script.py' 'a b' '$HOME' 'it'\"'\"'s'"


def test_single_node_module_command():
    assert torchrun_command("rlmeta", ["train-fomaml", "--out", "results/x y"], nproc=2, module=True) == (
        "torchrun --standalone --nproc_per_node=2 -m rlmeta train-fomaml --out 'results/x y'")


def test_multi_node_command():
    cmd = torchrun_command("scripts/train_fomaml.py", ["--out", "results/x y"], nproc=4, nodes=2)
    assert cmd == (
        "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=4 "
        "--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
        "--rdzv_endpoint=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1):29500 "
        "scripts/train_fomaml.py --out 'results/x y'")


def test_multi_node_port_cpus_and_launcher():
    cmd = torchrun_command("t.py", [], nproc=8, nodes=3, port=29611, cpus_per_task=16,
                           torchrun="/venv/bin/python -m torch.distributed.run")
    assert cmd == (
        "srun --nodes=3 --ntasks-per-node=1 --cpus-per-task=16 /venv/bin/python -m torch.distributed.run "
        f"--nnodes=3 --nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
        f"--rdzv_endpoint={HEAD_NODE_EXPR}:29611 t.py")


def test_srun_form_on_one_node():
    assert torchrun_command("t.py", [], nproc=2, nodes=1, srun=True).startswith(
        "srun --nodes=1 --ntasks-per-node=1 torchrun --nnodes=1 --nproc_per_node=2 --rdzv_id=$SLURM_JOB_ID ")


@pytest.mark.parametrize("kw", [dict(nproc=0), dict(nproc=2, nodes=0), dict(nproc=1.5), dict(nproc=2, port=0),
                                dict(nproc=2, nodes=2, srun=False)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        torchrun_command("t.py", [], **kw)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_ON_NODE": "4"}, 1),
])
def test_gpus_from_env(env, expected):
    assert gpus_from_env(env) == expected


def test_nproc_for():
    class Res:
        gpu = 2
    assert nproc_for({"gpu": 4}) == 4
    assert nproc_for({"gpu": 0}, cpu_procs=3) == 3
    assert nproc_for({}, cpu_procs=2) == 2
    assert nproc_for(Res()) == 2
    with pytest.raises(ValueError):
        nproc_for({"gpu": -1})


def test_default_port():
    assert default_port({}) == 29500
    assert default_port({"SLURM_JOB_ID": "12345"}) == 29845
    assert default_port({"SLURM_JOB_ID": "7", "RLMETA_TORCHRUN_PORT": "31000"}) == 31000


def _dry(argv, capsys, monkeypatch, env=None):
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID", "RLMETA_TORCHRUN_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    assert main(["launch", "--dry-run", "--torchrun", "torchrun", *argv]) == 0
    return capsys.readouterr().out.strip()


def test_cli_single_node(capsys, monkeypatch):
    out = _dry(["--nproc", "2", "--nodes", "1", "--", "scripts/train_fomaml.py", "--out", "x", "--nproc", "9"],
               capsys, monkeypatch)
    assert out == "torchrun --standalone --nproc_per_node=2 scripts/train_fomaml.py --out x --nproc 9"


def test_cli_step_runs_as_module(capsys, monkeypatch):
    out = _dry(["--nproc", "2", "--", "train-fomaml", "--out", "x"], capsys, monkeypatch)
    assert out == "torchrun --standalone --nproc_per_node=2 -m rlmeta train-fomaml --out x"
    # the step's own options (even ones named like launch's) pass through untouched
    out = _dry(["--nproc", "2", "--", "eval-adaptation", "--nproc", "9", "--out", "a b"], capsys, monkeypatch)
    assert out == "torchrun --standalone --nproc_per_node=2 -m rlmeta eval-adaptation --nproc 9 --out 'a b'"


def test_cli_path_is_a_script(capsys, monkeypatch):
    """Only an exact step name runs as a module; a path (even one ending in a step's name) is a script."""
    out = _dry(["--nproc", "1", "--", "./train-fomaml", "--out", "x"], capsys, monkeypatch)
    assert out == "torchrun --standalone --nproc_per_node=1 ./train-fomaml --out x"


def test_cli_cpu_fallback(capsys, monkeypatch):
    out = _dry(["--nproc", "0", "--nodes", "1", "--cpu-procs", "3", "--", "t.py"], capsys, monkeypatch)
    assert out == "torchrun --standalone --nproc_per_node=3 t.py"


def test_cli_auto_uses_visible_gpus(capsys, monkeypatch):
    assert _dry(["--", "t.py"], capsys, monkeypatch, {"CUDA_VISIBLE_DEVICES": "0,1"}) == (
        "torchrun --standalone --nproc_per_node=2 t.py")
    assert _dry(["--cpu-procs", "2", "--", "t.py"], capsys, monkeypatch) == (
        "torchrun --standalone --nproc_per_node=2 t.py")


def test_cli_multi_node_splits_job_gpus(capsys, monkeypatch):
    out = _dry(["--nproc", "8", "--nodes", "2", "--cpus-per-task", "16", "--port", "29600", "--", "t.py", "a"],
               capsys, monkeypatch)
    assert out == ("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 torchrun --nnodes=2 --nproc_per_node=4 "
                   f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint={HEAD_NODE_EXPR}:29600 t.py a")


def test_cli_multi_node_step(capsys, monkeypatch):
    out = _dry(["--nproc", "8", "--nodes", "2", "--cpus-per-task", "16", "--port", "29600", "--", "train-fomaml",
                "--out", "x"], capsys, monkeypatch)
    assert out == ("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 torchrun --nnodes=2 --nproc_per_node=4 "
                   f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint={HEAD_NODE_EXPR}:29600 "
                   "-m rlmeta train-fomaml --out x")


def test_cli_port_per_slurm_job(capsys, monkeypatch):
    out = _dry(["--nproc", "2", "--nodes", "2", "--", "t.py"], capsys, monkeypatch, {"SLURM_JOB_ID": "4242"})
    assert f"--rdzv_endpoint={HEAD_NODE_EXPR}:29742 t.py" in out


def test_cli_rejects_uneven_split(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["launch", "--dry-run", "--nproc", "3", "--nodes", "2", "--", "t.py"])
    assert e.value.code == 2
    assert "rlmeta launch: error: --nproc 3 (GPUs of the job) is not a multiple of --nodes 2" in capsys.readouterr().err


def _launch(args, env=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "rlmeta", "launch", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cli_execs_the_command():
    out = _launch(["--torchrun", "echo", "--nproc", "2", "--", "t.py", "a b"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "--standalone --nproc_per_node=2 t.py a b"
    assert "rlmeta launch: echo --standalone --nproc_per_node=2 t.py 'a b'" in out.stderr


def test_cli_execs_a_step_as_module():
    out = _launch(["--torchrun", "echo", "--nproc", "1", "--", "train-fomaml", "--out", "x"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "--standalone --nproc_per_node=1 -m rlmeta train-fomaml --out x"
    assert "rlmeta launch: echo --standalone --nproc_per_node=1 -m rlmeta train-fomaml --out x" in out.stderr


def test_cli_multi_node_outside_slurm_fails_clearly():
    out = _launch(["--torchrun", "echo", "--nproc", "2", "--nodes", "2", "--", "t.py"])
    assert out.returncode != 0
    assert "rlmeta launch: a multi-node (srun) launch must run inside a SLURM job" in out.stderr


@pytest.mark.slow
def test_cli_runs_two_cpu_workers(tmp_path):
    """A real 2-process gloo all-reduce through torchrun --standalone (no GPU, no SLURM)."""
    result = tmp_path / "r.json"
    out = _launch(["--nproc", "0", "--cpu-procs", "2", "--", str(ALLREDUCE), str(result)],
                  env={"CUDA_VISIBLE_DEVICES": ""}, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(result.read_text())
    assert summary["world_size"] == 2 and summary["sum"] == 3.0


# -- the pre-timeout signal (rlmeta.preempt) ----------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("4:05", 245.0), ("1:02:03", 3723.0), ("2-00:00:10", 172810.0),
                                           ("0:59\n", 59.0), ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_parse_time_left(text, seconds):
    from rlmeta.launch import parse_time_left

    assert parse_time_left(text) == seconds


def test_signal_wait():
    from rlmeta.launch import signal_wait

    assert signal_wait(3600, 300) == 3300 and signal_wait(296, 300) == 148 and signal_wait(500, 300) == 250


def test_supervise_signals_the_tree_and_returns_its_status(tmp_path):
    """The launcher's SLURM mode: SIGUSR1 reaches a grandchild that handles it (the trainer) at the set time, and is
    repeated; a grandchild that does not handle it ignores it (torchrun's agent); the command's status comes back."""
    import time

    from rlmeta.launch import supervise

    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: got.append(time.monotonic()))\n"
        "t0 = time.monotonic()\n"
        "while len(got) < 2 and time.monotonic() - t0 < 30: time.sleep(0.05)\n"
        f"open({str(tmp_path / 'got')!r}, 'w').write(str(len(got)))\n"
        "sys.exit(75)\n")
    bystander = f"{sys.executable} -c 'import time; time.sleep(60)'"
    cmd = f"{bystander} & {sys.executable} {trainer}; status=$?; kill %1; exit $status"
    t0 = time.monotonic()
    import rlmeta.launch as L

    old = L.RESEND_S
    L.RESEND_S = 0.5
    try:
        assert supervise(cmd, dict(os.environ), time.monotonic() + 1.0) == 75
    finally:
        L.RESEND_S = old
    assert (tmp_path / "got").read_text() == "2" and 1.0 <= time.monotonic() - t0 < 20


def test_a_signal_while_the_launcher_starts_is_passed_on_not_fatal(tmp_path):
    """SIGUSR1 that reaches ``rlmeta launch`` inside a SLURM job while it is still asking squeue for the time left
    (before it started the command) used to terminate it (Python's default action), failing the job; it is now kept
    and passed on to the trainer once that runs (here long before the launcher's own timer, 120 s away)."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ntouch {asked}\nsleep 1.5\necho 4:00\n")
    (bin_dir / "squeue").chmod(0o755)
    trainer = tmp_path / "trainer.py"
    trainer.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
        "time.sleep(60)\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "RLMETA_SIGNAL_BEFORE": "300"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "rlmeta", "launch", "--nproc", "1", "--direct-if-one", "--",
                             str(trainer)], env=env, stderr=subprocess.PIPE, text=True)
    while not asked.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "240 s left in SLURM job 4242: SIGUSR1 to the trainers in 120 s" in err
    assert "SIGUSR1 to" in err.split("SIGUSR1 to the trainers")[1]  # passed on (the "... processes" line)
    assert time.monotonic() - t0 < 60


def test_preemption_exit_records_the_stop(tmp_path, monkeypatch):
    from rlmeta.preempt import EXIT_REQUEUE, INTERRUPTIONS, Preemption, restart_count

    p = Preemption()
    with p:
        os.kill(os.getpid(), p.signum)
    assert p.received and p.agreed()  # one process: no all-reduce
    with pytest.raises(SystemExit) as e:
        p.exit(7, tmp_path / "checkpoint-7", is_main=True, env={})
    assert e.value.code == EXIT_REQUEUE
    record = json.loads((tmp_path / INTERRUPTIONS).read_text())
    assert (record["step"], record["signal"], record["slurm_job_id"]) == (7, "SIGUSR1", None)
    assert restart_count("12", {"SLURM_RESTART_COUNT": "3"}) == 3 and restart_count(None, {}) is None
