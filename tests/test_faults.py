"""Training that survives faults, and runs that repeat, through Snakemake.

Faults: a training job SIGKILLed after its first checkpoint and run again with the same command ends with
every step's train_metrics row and the weights of a run that was never interrupted; ``rlmeta unlock``
removes the killed run's stale lock (and leaves a live run's alone).
Determinism: the same workflow run twice from scratch gives bit-identical checkpoints, equal evidence of
training and equal summary.json numbers.

One module-scoped work directory runs the reference from scratch once, for one experiment of each trainer
(MLX ``headlines_gspo``, TRL ``gsm8k_gspo`` full fine-tuning, FOMAML ``math_fomaml``), shortened by
tests/fixtures/reproducibility.yaml: data, the tiny model, the warm starts, each experiment's uninterrupted
training and the RL experiments' evaluations. A second from-scratch run in another work directory is the
determinism comparison (one module, so that both share the reference on one pytest-xdist worker).
Each fault test copies the reference's results folder without the training outputs into a work directory of
its own, starts ``snakemake <exp>/train_metrics.parquet`` in its own process group, SIGKILLs it once the first
numbered checkpoint is complete, runs ``rlmeta unlock --directory`` and then the same command again.
Snakemake's workflow profile (profiles/default, loaded on its own) sets ``rerun-incomplete``: the rerun deletes
the killed job's declared outputs and runs it again, and the trainer resumes from its checkpoint, rebuilding
the whole metrics table from the rows the checkpoint carries.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rlmeta import checkpoints
from rlmeta.locks import lock_files, unlock_if_stale
from rlmeta.settings import ROOT
from rlmeta.testing.workflow import SNAKEMAKE, common_args, mirror_workflow, snakemake, snakemake_env

CONFIG = ROOT / "tests" / "fixtures" / "reproducibility.yaml"  # one experiment per trainer, shrunk to seconds
# experiment: (training rule, first checkpoint folder, progress line of step N, the resume log line, base policy)
TRAINING = {
    "headlines_gspo": ("train_mlx", "2", r"^step (\d+)/6 reward=", "resuming {ck}/2 at step 2",
                       "warmstart/tiny_inner_scientist_*"),
    # updates_per_batch 2 (the experiment's): 8 optimizer steps, a checkpoint every 2
    "gsm8k_gspo": ("train_trl", "checkpoint-2", r"step (\d+)/8 loss=", "resuming {ck}/checkpoint-2",
                   "warmstart/tiny_xml_cot_*"),
    "math_fomaml": ("train_fomaml", "2", r"step (\d+)/6 meta/loss", "resuming from {ck}/2 (step 2)", "models/tiny"),
}
STEPS = {"headlines_gspo": 6, "gsm8k_gspo": 8, "math_fomaml": 6}
UPSTREAM = {"fetch_rss", "build_headlines", "prepare_gsm8k", "prepare_math", "split_math_tasks", "build_model",
            "make_prompts", "warmstart"}
HAVE_MLX = importlib.util.find_spec("mlx") is not None
RUN = [e for e, (rule, *_) in TRAINING.items() if HAVE_MLX or rule != "train_mlx"]
RL_RUN = [e for e in RUN if TRAINING[e][0] != "train_fomaml"]


def env() -> dict:
    """The environment of ``rlmeta.testing.workflow.snakemake``: this venv's bin first on PATH."""
    return snakemake_env()


SEED = 1234  # the default config's seed: an RL experiment's one training run is results/<exp>/seed1234/


def run_dir(results: Path, exp: str) -> Path:
    """Where an experiment's training writes: its seed's folder (RL), the experiment's folder (FOMAML)."""
    return results / exp if TRAINING[exp][0] == "train_fomaml" else results / exp / f"seed{SEED}"


def target(results: Path, exp: str) -> Path:
    return run_dir(results, exp) / "train_metrics.parquet"


def train_log(results: Path, exp: str) -> Path:
    return results / "logs" / exp / ("train.log" if TRAINING[exp][0] == "train_fomaml" else f"train_seed{SEED}.log")


def ran(out: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from Snakemake's "Job stats" table."""
    text = out.stdout + out.stderr
    table = text[text.index("Job stats:"):].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def finished(results: Path, exp: str) -> Path:
    """What a from-scratch run builds per experiment: an RL experiment's summary.json (data, warm start,
    training, generation, scoring, evaluation), FOMAML's training metrics."""
    return target(results, exp) if TRAINING[exp][0] == "train_fomaml" else results / exp / "eval" / "summary.json"


def run_from_scratch(base: Path, name: str, experiments: list[str]) -> Path:
    """The workflow over CONFIG for ``experiments`` into an empty results folder of its own work directory;
    that folder."""
    workdir = mirror_workflow(base / name)
    results = workdir / "results"
    t0 = time.monotonic()
    targets = [finished(results, e) for e in experiments]
    out = snakemake(["--cores", "2", *common_args(results, [CONFIG]), "--", *targets], cwd=workdir, timeout=900)
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    print(f"{name} run from scratch: {time.monotonic() - t0:.0f}s")
    assert {r: n for r, n in ran(out).items() if r.startswith("train_")} == {TRAINING[e][0]: 1 for e in experiments}
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(config, results folder) of the uninterrupted run: data, model, warm starts, the three trainings and the
    RL experiments' evaluations. Also the first of the two determinism runs."""
    return CONFIG, run_from_scratch(tmp_path_factory.mktemp("faults"), "reference", RUN)


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    """The RL experiments again, from scratch, into another results folder (FOMAML's repeat is the fault test's:
    a resumed run equal to the reference bit for bit, over the same data and model)."""
    return run_from_scratch(tmp_path_factory.mktemp("determinism"), "second", RL_RUN)


def copy_without_training(results: Path, dest: Path) -> Path:
    """The reference's results folder without any training output (data, model, prompts, warm starts only)."""
    def skip(folder, names):
        here = Path(folder)
        return [n for n in names if n == "logs" or (here.parent == results and (
            n in ("checkpoints", "train_metrics.parquet") or re.fullmatch(r"seed\d+", n)))]
    shutil.copytree(results, dest, symlinks=True, ignore=skip)
    assert not list(dest.glob("*/checkpoints")) and not list(dest.glob("*/train_metrics.parquet"))
    assert not list(dest.glob("*/seed*"))
    return dest


def descendants(pid: int) -> list[int]:
    """Every process started (transitively) by ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL Snakemake's process group and every process it started, at once (a machine or job allocation
    dying): torchrun starts its workers in sessions of their own, which a signal to the group alone misses."""
    pids = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_after_first_checkpoint(workdir: Path, args: list[str], marker: Path, log: Path) -> None:
    """Start ``snakemake ARGS`` in its own process group; SIGKILL it all as soon as ``marker`` exists."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(SNAKEMAKE + args, cwd=workdir, env=env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 600
        try:
            while not marker.exists():
                assert proc.poll() is None, f"Snakemake ended before {marker} appeared:\n{tail(log.read_text())}"
                assert time.monotonic() < deadline, f"no {marker} after 600 s:\n{tail(log.read_text())}"
                time.sleep(0.02)
        finally:
            kill_everything(proc)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without the timings (step_seconds, seconds), NaN written as "nan" (FOMAML's subjects a step did not
    sample)."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if k not in ("step_seconds", "seconds")} for r in rows]


def read_evidence(path: Path) -> list[dict]:
    """The rows of eval_curve.parquet, or of every file of a rollouts folder in step order."""
    from rlmeta.rl.evidence import read_rollouts

    table = read_rollouts(path) if path.is_dir() else pq.read_table(path)
    return [] if table is None else table.to_pylist()


def killed_and_resumed(reference, tmp_path: Path, exp: str, show_lock_error: bool = False) -> None:
    config, ref_results = reference
    rule, first, progress, resuming, base = TRAINING[exp]
    workdir = mirror_workflow(tmp_path / "killed")
    results = copy_without_training(ref_results, workdir / "results")
    # the same --cores as the reference: the training job gets the same threads (its rule's), so even reductions whose
    # order depends on the thread count (FOMAML's logged grad_norm) repeat bit for bit
    args = ["--cores", "2", *common_args(results, [config]), "--", str(target(results, exp))]
    ck = run_dir(results, exp) / "checkpoints"

    t0 = time.monotonic()
    kill_after_first_checkpoint(workdir, args, ck / first / checkpoints.MARKER, tmp_path / "killed.log")
    killed_at = time.monotonic() - t0
    # killed after the first checkpoint, before the next one and before the end
    assert [p.name for _, p in checkpoints.numbered(ck)] == [first]
    assert not (ck / "final").exists() and not target(results, exp).exists()
    locks = lock_files(workdir)
    assert locks, "a killed Snakemake leaves its lock"

    if show_lock_error:  # without the unlock the same command refuses to start
        out = snakemake(args, cwd=workdir)
        assert out.returncode != 0 and "cannot be locked" in out.stdout + out.stderr, tail(out.stdout + out.stderr)
        assert not (ck / "final").exists()
    unlocked = subprocess.run([sys.executable, "-m", "rlmeta", "unlock", "--directory", str(workdir)],
                              capture_output=True, text=True, env=env())
    assert unlocked.returncode == 0, unlocked.stderr
    assert f"removed {len(locks)} stale lock file(s)" in unlocked.stderr and lock_files(workdir) == []

    t1 = time.monotonic()
    out = snakemake(args, cwd=workdir)
    text = out.stdout + out.stderr
    assert out.returncode == 0, tail(text)
    assert "cannot be locked" not in text and ran(out).get(rule) == 1 and not UPSTREAM & set(ran(out)), ran(out)
    print(f"{exp}: killed {killed_at:.0f}s after the start, rerun {time.monotonic() - t1:.0f}s")
    # the rerun resumed from the checkpoint (its log is the rerun's alone) and trained only the steps after it
    log = train_log(results, exp).read_text()
    assert resuming.format(ck=ck) in log, tail(log)
    n = STEPS[exp]
    done = int(re.search(r"\d+", first).group())
    assert [int(s) for s in re.findall(progress, log, re.M)] == list(range(done + 1, n + 1)), tail(log)

    # every step's row, equal to the uninterrupted run's but for the timings; the same final weights
    straight = pq.read_table(target(ref_results, exp))
    resumed = pq.read_table(target(results, exp))
    assert resumed.schema == straight.schema
    rows = resumed.to_pylist()
    assert [r["step"] for r in rows] == list(range(1, n + 1))
    assert comparable(rows) == comparable(straight.to_pylist())
    if rule != "train_fomaml":  # the evaluations during training and every rollout, as in the uninterrupted run
        for name in ("eval_curve.parquet", "rollouts"):
            straight, resumed = (read_evidence(run_dir(r, exp) / name) for r in (ref_results, results))
            assert comparable(resumed) == comparable(straight) and straight, name
        assert sorted(p.name for p in (run_dir(results, exp) / "rollouts").iterdir()) == sorted(
            p.name for p in (run_dir(ref_results, exp) / "rollouts").iterdir())
    a, b = weights(run_dir(ref_results, exp) / "checkpoints" / "final"), weights(ck / "final")
    diff = max_abs_difference(a, b)
    print(f"{exp}: final weights' max abs difference {diff}")
    assert diff == 0.0  # bit for bit
    (base_dir,) = ref_results.glob(base)
    start = weights(base_dir)
    assert any(not torch.equal(start[k], a[k]) for k in start.keys() & a.keys()), "training changed no weight"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
def test_mlx_training_killed_after_a_checkpoint_resumes_to_the_same_run(reference, tmp_path):
    killed_and_resumed(reference, tmp_path, "headlines_gspo", show_lock_error=True)


@pytest.mark.slow
def test_trl_training_killed_after_a_checkpoint_resumes_to_the_same_run(reference, tmp_path):
    killed_and_resumed(reference, tmp_path, "gsm8k_gspo")


@pytest.mark.slow
def test_fomaml_training_killed_after_a_checkpoint_resumes_to_the_same_run(reference, tmp_path):
    killed_and_resumed(reference, tmp_path, "math_fomaml")


# -- determinism -----------------------------------------------------------------------------------
# The same commit, lock and config, run twice from scratch on one machine (the reference and a second run,
# every job of each: feeds, tokenizer and model build, warm starts, training, generation, scoring,
# evaluation): bit-identical checkpoints and equal summary.json numbers on every trainer. What makes it so:
# fixed seeds of every sampler (rlmeta.policy.base.derive_seed), data order from those seeds, and thread
# counts fixed by each rule's `threads` (Snakemake exports them as OMP_NUM_THREADS). What cannot be made so
# is listed in docs/reproducibility.md.



def numbers(summary: dict) -> dict:
    """summary.json less what names the run rather than measures it: paths and the provenance record."""
    out = {k: v for k, v in summary.items()
           if k not in ("provenance", "checkpoint", "checkpoints", "base_checkpoint")}
    out["sha256"] = (summary["base_checkpoint"]["sha256"], summary["checkpoint"]["sha256"])
    return out


@pytest.mark.slow
def test_two_runs_from_scratch_write_the_same_checkpoints(reference, second_run):
    from safetensors.torch import load_file

    first, second = reference[1], second_run
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors") if "math_fomaml" not in p.parts)
    # the built model, both warm starts, every checkpoint of both RL trainers (MLX: model and optimizer)
    for exp in RL_RUN:
        assert run_dir(first, exp).relative_to(first) / "checkpoints" / "final" / "model.safetensors" in files
    assert any(p.name == "optimizer.safetensors" for p in files)
    assert sorted(p.relative_to(second) for p in second.rglob("*.safetensors")) == files
    diffs = {str(f): max_abs_difference(load_file(first / f), load_file(second / f)) for f in files}
    assert diffs == {str(f): 0.0 for f in files}


@pytest.mark.slow
@pytest.mark.parametrize("exp", RL_RUN)
def test_two_runs_from_scratch_write_the_same_evidence_of_training(reference, second_run, exp):
    """Evaluations during training, every rollout and the metrics rows: equal but for the timings."""
    for name in ("train_metrics.parquet", "eval_curve.parquet", "rollouts"):
        first, second = (comparable(read_evidence(run_dir(r, exp) / name)) for r in (reference[1], second_run))
        assert first == second and first, name


@pytest.mark.slow
@pytest.mark.parametrize("exp", RL_RUN)
def test_two_runs_from_scratch_give_equal_summary_numbers(reference, second_run, exp):
    import json

    first, second = (json.loads((r / exp / "eval" / "summary.json").read_text()) for r in (reference[1], second_run))
    assert numbers(first) == numbers(second)
    # the comparison is over real numbers: rewards, their intervals, task accuracy
    assert isinstance(first["reward"]["trained_mean"], float) and first["reward"]["n_prompts"] == 4
    if first["primary_accuracy"]:  # GSM8K; the headline template has none
        assert first["primary_accuracy"].removeprefix("accuracy/") in first["accuracy"]
    # and over trained weights: training moved them (a zero update would make the test vacuous)
    assert first["checkpoint"]["sha256"] != first["base_checkpoint"]["sha256"]


# -- rlmeta unlock ---------------------------------------------------------------------------------


@pytest.fixture
def fake_snakemake(tmp_path):
    """Start a process whose command line is ``python <dir>/snakemake`` (it sleeps) in a given folder; the
    processes are stopped (by their id) after the test."""
    script = tmp_path / "bin" / "snakemake"
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(120)\n")
    started = []

    def start(cwd: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=cwd)
        started.append(proc)
        deadline = time.monotonic() + 10  # until it runs the script (before its exec it is a copy of pytest)
        while str(script).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def locked(workdir: Path) -> list[Path]:
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    files = [locks / "0.input.lock", locks / "0.output.lock"]
    for f in files:
        f.write_text(str(workdir / "results" / "x") + "\n")
    return files


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="the check reads /proc (Linux)")
def test_unlock_leaves_the_lock_of_a_running_snakemake_alone(tmp_path, fake_snakemake):
    workdir, elsewhere = tmp_path / "wf", tmp_path / "other"
    workdir.mkdir()
    elsewhere.mkdir()
    assert unlock_if_stale(workdir) == "no lock"
    files = locked(workdir)
    live = fake_snakemake(workdir)
    result = subprocess.run([sys.executable, "-m", "rlmeta", "unlock", "--directory", str(workdir)],
                            capture_output=True, text=True, env=env())
    assert result.returncode == 0
    assert result.stderr.strip() == (f"rlmeta unlock: in use by running Snakemake or rlmeta process(es) "
                                     f"{live.pid}: left alone")
    assert all(f.exists() for f in files)
    live.kill()
    live.wait()
    other = fake_snakemake(elsewhere)  # a Snakemake in another folder does not hold this one's lock
    assert other.poll() is None
    result = subprocess.run([sys.executable, "-m", "rlmeta", "unlock", "--directory", str(workdir)],
                            capture_output=True, text=True, env=env())
    assert result.returncode == 0
    assert result.stderr.strip() == (f"rlmeta unlock: removed 2 stale lock file(s) (no Snakemake or rlmeta process "
                                     f"was using {workdir.resolve()})")
    assert not any(f.exists() for f in files) and lock_files(workdir) == []
    assert unlock_if_stale(workdir) == "no lock"


@pytest.mark.parametrize("cmdline,counts", [
    (["/x/.venv/bin/python", "/x/.venv/bin/snakemake", "--cores", "2"], True),
    (["python", "-m", "snakemake", "-n"], True),
    (["/x/.venv/bin/python", "-m", "rlmeta", "train-mlx", "--model", "m"], True),
    # a torchrun worker outlives a SIGKILLed Snakemake (it runs in a session of its own)
    (["/x/.venv/bin/python", "-u", "-m", "rlmeta", "train-fomaml", "--model", "m"], True),
    (["/x/.venv/bin/python", "/x/.venv/bin/torchrun", "--standalone", "-m", "rlmeta", "train-fomaml"], True),
    (["/x/.venv/bin/python", "/x/.venv/bin/rlmeta", "unlock"], False),
    (["python", "-m", "pytest", "tests/"], False),
])
def test_unlock_counts_snakemake_and_the_steps_it_started(cmdline, counts):
    from rlmeta.locks import _is_workflow_process

    assert _is_workflow_process(cmdline) is counts


def test_a_torchrun_worker_ends_with_its_launcher(tmp_path):
    """exit_with_launcher: a worker whose parent dies (SIGKILL) exits within about a second."""
    pid_file = tmp_path / "worker.pid"
    worker = (f"import os, time, pathlib; os.environ['TORCHELASTIC_RUN_ID'] = 'x'\n"
              f"from rlmeta.meta.distributed import exit_with_launcher\n"
              f"assert exit_with_launcher(poll_s=0.1)\n"
              f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
              f"time.sleep(60)\n")
    # the launcher: starts the worker in a session of its own (as torchrun does), then waits
    launcher = (f"import subprocess, sys, time\n"
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
                f"time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env())
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and b"zombie" not in _state(pid):
        assert time.monotonic() < deadline, "the orphaned worker is still running"
        time.sleep(0.05)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"
