"""The slurm profile on a real (single-machine) SLURM cluster, and the sbatch lines it makes.

Tests marked ``slurm`` install and start a local SLURM 22.05 cluster with
``scripts/slurm/install.sh`` and ``scripts/slurm/start.sh`` (root and apt-get
needed, else they skip; ``RLMETA_SKIP_SLURM=1`` skips them too), then run
``snakemake --profile <copy of profiles/slurm>`` on ``tests/fixtures/slurm_wf``
and check with ``sacct`` what SLURM really ran.  A cluster this session started
is stopped at the end unless ``RLMETA_SLURM_KEEP=1``.

The other tests need no cluster: they check the profiles and feed the profile's
resources to the executor plugin's own sbatch builder.

To run another workflow on the cluster (e.g. the real tiny FOMAML experiment)::

    def test_fomaml_on_slurm(slurm_cluster, tmp_path):
        run = slurm_cluster.run(ROOT / "Snakefile", tmp_path, targets=[...],
                                config=["platform=slurm", ...], cwd=ROOT)
        assert run.returncode == 0, run.log_tail()
        rows = run.jobs_by_rule()       # rule name -> sacct row (dict)
        assert rows["train_fomaml"]["State"] == "COMPLETED"
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "scripts" / "slurm"
PROFILES = ROOT / "profiles"
SLURM_PROFILE = PROFILES / "slurm"
FIXTURE_WF = ROOT / "tests" / "fixtures" / "slurm_wf"
LOCAL_PARTITION = os.environ.get("RLMETA_SLURM_PARTITION", "debug")

SACCT_FIELDS = ["JobID", "JobName", "State", "ExitCode", "Elapsed", "NodeList", "AllocTRES", "Comment", "SubmitLine"]
GPU_RULES = ["warmstart", "generate", "eval_adaptation", "train_trl", "train_fomaml", "train_meta_baseline"]
# their rules set gpu themselves (meta.nproc; train.distributed.nproc plus vLLM's server GPUs)
SELF_GPU_RULES = ("train_fomaml", "train_meta_baseline", "train_trl")


# --------------------------------------------------------------------------- helpers

def _env() -> dict[str, str]:
    """Environment for snakemake: this venv's bin first (python, torchrun), sbin for scontrol."""
    path = os.environ.get("PATH", "")
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{path}:/usr/sbin:/sbin")


def node_capacity(partition: str = LOCAL_PARTITION) -> dict[str, int]:
    """Node count, and CPUs, memory (MB) and GPUs of the smallest node of ``partition``."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G"], check=True,
                         capture_output=True, text=True).stdout.split()
    nodes = {}
    for line in out:
        name, cpus, mem, gres = line.split("|")
        m = re.search(r"gpu(?::[^:,()]+)?:(\d+)", gres)
        nodes[name] = (int(cpus.rstrip("+")), int(mem.rstrip("+")), int(m.group(1)) if m else 0)
    cpus, mem, gpus = (min(v[i] for v in nodes.values()) for i in range(3))
    return {"nodes": len(nodes), "cpus": cpus, "mem_mb": mem, "gpus": gpus}


def _fit(res: dict, cap: dict) -> dict:
    """Shrink one rule's resources so the job fits the local node (else sbatch refuses it)."""
    res = dict(res)
    tasks = int(res.get("tasks") or 1)
    if "cpus_per_task" in res:
        res["cpus_per_task"] = max(1, min(int(res["cpus_per_task"]), cap["cpus"] // tasks))
    if "mem_mb" in res:
        res["mem_mb"] = min(int(res["mem_mb"]), cap["mem_mb"] // 2)
    if "gpu" in res:
        res["gpu"] = min(int(res["gpu"]), cap["gpus"])
    if "nodes" in res:
        res["nodes"] = min(int(res["nodes"]), cap.get("nodes", 1))
    return res


def make_local_profile(dest: Path, base: Path = SLURM_PROFILE, partition: str = LOCAL_PARTITION,
                       capacity: dict | None = None, extra: dict | None = None) -> Path:
    """A copy of the slurm profile for this machine's cluster.

    Same settings as ``base``, except: the partition is the local one, no account,
    per-rule resources shrunk to fit the local node, the first status check after
    1 s (instead of tens of seconds) and successful jobs' logs kept.  ``extra``
    is merged over the result (e.g. ``{"set-resources": {...}}``).
    """
    cfg = yaml.safe_load((base / "config.yaml").read_text())
    cap = capacity or node_capacity(partition)
    defaults = dict(item.split("=", 1) for item in cfg.get("default-resources", []))
    defaults = {k: v for k, v in defaults.items() if k not in ("slurm_partition", "slurm_account")}
    defaults = _fit(defaults, cap)
    cfg["default-resources"] = [f"slurm_partition={partition}"] + [f"{k}={v}" for k, v in defaults.items()]
    cfg["set-resources"] = {rule: _fit(res, cap) for rule, res in (cfg.get("set-resources") or {}).items()}
    cfg["slurm-init-seconds-before-status-checks"] = 1
    cfg["slurm-keep-successful-logs"] = True
    cfg["latency-wait"] = 5
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def sacct_rows(name: str, fields: Iterable[str] = SACCT_FIELDS, allocations_only: bool = True) -> list[dict]:
    """sacct rows (dicts) of the jobs named ``name`` (the plugin names every job of a run by its run ID)."""
    fields = list(fields)
    start = (datetime.now() - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    cmd = ["sacct", "-P", "-n", "--name", name, "-S", start, "-E", "now", "--format", ",".join(fields)]
    if allocations_only:
        cmd.insert(1, "-X")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        if line.strip():
            # the last field (SubmitLine) may itself contain '|'
            rows.append(dict(zip(fields, line.split("|", len(fields) - 1))))
    return rows


@dataclass
class SlurmRun:
    """One snakemake run under the slurm profile, with what SLURM recorded about it."""
    returncode: int
    log: str
    workdir: Path
    run_id: str | None
    seconds: float
    jobs: list[dict] = field(default_factory=list)

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log.splitlines()[-n:])

    def jobs_by_rule(self) -> dict[str, dict]:
        """sacct allocation rows keyed by rule name (from the plugin's ``--comment rule_<name>``)."""
        return {row["Comment"].removeprefix("rule_").split("_wildcards_")[0]: row for row in self.jobs}

    def sbatch_calls(self) -> dict[str, str]:
        """rule name -> the sbatch command line the plugin logged (needs --verbose)."""
        calls = {}
        for m in re.finditer(r"^sbatch call: (sbatch .*?--comment (\S+).*)$", self.log, re.M):
            calls[m.group(2).removeprefix("rule_").split("_wildcards_")[0]] = m.group(1)
        return calls


class SlurmCluster:
    """The local cluster; ``run`` drives snakemake with (a local copy of) the slurm profile."""

    def __init__(self, partition: str = LOCAL_PARTITION):
        self.partition = partition
        self.capacity = node_capacity(partition)

    def run(self, snakefile: Path, workdir: Path, *, targets: Iterable[str] = (), config: Iterable[str] = (),
            configfiles: Iterable[Path] = (), profile: Path | None = None, profile_extra: dict | None = None,
            extra_args: Iterable[str] = (), cwd: Path | None = None, timeout: float = 600) -> SlurmRun:
        """Run snakemake on ``snakefile`` in ``workdir`` with a local copy of profiles/slurm.

        ``config`` entries (KEY=VALUE) are added to the profile's own ``config``
        list (platform=slurm): a CLI ``--config`` would otherwise replace it.
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if profile is None:
            profile = make_local_profile(workdir / ".test-profile", partition=self.partition,
                                         capacity=self.capacity, extra=profile_extra)
        cmd = [sys.executable, "-m", "snakemake", "--profile", str(profile), "-s", str(snakefile),
               "-d", str(workdir), "--verbose", *extra_args]
        if configfiles:
            cmd += ["--configfile", *map(str, configfiles)]
        if config:
            profile_config = yaml.safe_load((Path(profile) / "config.yaml").read_text()).get("config") or []
            cmd += ["--config", *profile_config, *config]
        cmd += list(targets)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd or workdir, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # snakemake cancels its SLURM jobs on SIGINT
            try:
                log, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                log, _ = proc.communicate()
            log += f"\n[test] snakemake killed after {timeout} s"
        seconds = time.monotonic() - t0
        m = re.search(r"SLURM run ID: (\S+)", log)
        run_id = m.group(1) if m else None
        jobs = sacct_rows(run_id) if run_id else []
        return SlurmRun(proc.returncode, log, workdir, run_id, seconds, jobs)


def _cluster_running() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


def _running_node_count() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=10)
    return len(set(out.stdout.split())) if out.returncode == 0 else 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """Install (once) and start the local SLURM cluster; yield a SlurmCluster.

    Nodes: $RLMETA_SLURM_NODES if set, else as many as a running cluster has, else 2
    (the second node needs `unshare -u`; if that fails the cluster gets 1 node and
    the two-node test skips).
    """
    if os.environ.get("RLMETA_SKIP_SLURM"):
        pytest.skip("RLMETA_SKIP_SLURM is set")
    if os.geteuid() != 0:
        pytest.skip(f"the local SLURM cluster needs root (running as {getpass.getuser()})")
    if not shutil.which("apt-get") and not shutil.which("slurmctld", path="/usr/sbin:/usr/bin"):
        pytest.skip("apt-get not available (Debian/Ubuntu needed) and SLURM not installed")
    inst = subprocess.run(["bash", str(SLURM_SCRIPTS / "install.sh")], capture_output=True, text=True, timeout=900)
    assert inst.returncode == 0, f"install.sh failed:\n{inst.stdout}\n{inst.stderr}"
    was_running = _cluster_running()
    nodes = os.environ.get("RLMETA_SLURM_NODES") or str((_running_node_count() if was_running else 0) or 2)

    def start(n: str):
        return subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=300,
                              env=dict(_env(), RLMETA_SLURM_PARTITION=LOCAL_PARTITION, RLMETA_SLURM_NODES=n))

    out = start(nodes)
    if out.returncode != 0 and "unshare" in out.stderr and nodes != "1":
        out = start("1")
    assert out.returncode == 0, f"start.sh failed:\n{out.stdout}\n{out.stderr}"
    yield SlurmCluster(LOCAL_PARTITION)
    if not was_running and not os.environ.get("RLMETA_SLURM_KEEP"):
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- cluster tests

@pytest.fixture(scope="module")
def fixture_run(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_wf")
    two_nodes = int(slurm_cluster.capacity["nodes"] >= 2)
    return slurm_cluster.run(FIXTURE_WF / "Snakefile", workdir, config=[f"two_nodes={two_nodes}"], timeout=400)


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_fixture_workflow_runs_under_slurm(fixture_run):
    run = fixture_run
    assert run.returncode == 0, run.log_tail()
    assert run.run_id, "no 'SLURM run ID' in the snakemake log"
    jobs = run.jobs_by_rule()
    # one SLURM job per cluster rule, none for the localrule
    two_nodes = (run.workdir / "out" / "two_nodes.json").exists() or "two_node_torchrun" in jobs
    expected = ["gpu_torchrun", "mpi_torchrun"] + (["two_node_torchrun"] if two_nodes else [])
    assert sorted(jobs) == expected, run.jobs
    for rule, row in jobs.items():
        assert row["State"] == "COMPLETED", (rule, row)
        assert row["ExitCode"] == "0:0", (rule, row)
        assert row["JobName"] == run.run_id
    assert "gres/gpu=1" in jobs["gpu_torchrun"]["AllocTRES"], jobs["gpu_torchrun"]
    assert "cpu=2" in jobs["mpi_torchrun"]["AllocTRES"], jobs["mpi_torchrun"]  # 2 tasks x 1 cpu

    light = (run.workdir / "out" / "light.txt").read_text()
    assert "slurm_job=none" in light, light  # ran on the submit host, outside any allocation

    import json
    gpu = json.loads((run.workdir / "out" / "gpu.json").read_text())
    mpi = json.loads((run.workdir / "out" / "mpi.json").read_text())
    assert gpu["world_size"] == 2 and gpu["sum"] == 3.0
    assert gpu["slurm_job_id"] == jobs["gpu_torchrun"]["JobID"]
    assert re.fullmatch(r"\d+", gpu["cuda_visible_devices"] or ""), gpu  # the one (fake) GPU SLURM allocated
    assert mpi["world_size"] == 2 and mpi["sum"] == 3.0
    assert mpi["slurm_job_id"] == jobs["mpi_torchrun"]["JobID"]


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_fixture_sbatch_and_srun_lines(fixture_run):
    run = fixture_run
    assert run.returncode == 0, run.log_tail()
    jobs = run.jobs_by_rule()
    calls = run.sbatch_calls()
    for rule in ("gpu_torchrun", "mpi_torchrun"):
        # what sacct stored is what the plugin ran (sacct drops the quotes of --wrap)
        submit = jobs[rule]["SubmitLine"]
        head = calls[rule].split(" --wrap=")[0]
        assert " ".join(submit.split()).startswith(" ".join(head.split())), (submit, head)
    gpu = " ".join(calls["gpu_torchrun"].split(" --wrap=")[0].split())
    mpi = " ".join(calls["mpi_torchrun"].split(" --wrap=")[0].split())
    assert re.fullmatch(
        rf"sbatch --parsable --job-name {run.run_id} --output \S+/rule_gpu_torchrun/%j.log --export=ALL "
        rf"--comment rule_gpu_torchrun -p {LOCAL_PARTITION} -t 5 --mem 2000 --nodes=1 --requeue --cpus-per-task=1 "
        rf"-D \S+ --gpus=1", gpu), gpu
    assert re.fullmatch(
        rf"sbatch --parsable --job-name {run.run_id} --output \S+/rule_mpi_torchrun/%j.log --export=ALL "
        rf"--comment rule_mpi_torchrun -p {LOCAL_PARTITION} -t 5 --mem 2000 --nodes=1 --requeue --ntasks=2 "
        rf"--cpus-per-task=1 -D \S+ --gpus=1", mpi), mpi

    # job steps: the plugin wraps a non-MPI rule in 'srun -n1'; the mpi rule's step is our srun torchrun
    steps = sacct_rows(run.run_id, ["JobID", "JobName", "State", "AllocTRES"], allocations_only=False)
    by_id = {r["JobID"]: r for r in steps}
    gpu_id, mpi_id = jobs["gpu_torchrun"]["JobID"], jobs["mpi_torchrun"]["JobID"]
    assert by_id[f"{gpu_id}.0"]["State"] == "COMPLETED"
    assert by_id[f"{mpi_id}.0"]["JobName"] == "torchrun" and by_id[f"{mpi_id}.0"]["State"] == "COMPLETED"
    assert "gres/gpu=1" in by_id[f"{gpu_id}.0"]["AllocTRES"]

    logs = {p.parent.name: p.read_text() for p in (run.workdir / ".snakemake" / "slurm_logs").glob("rule_*/*.log")}
    assert "srun -n1 --cpu-bind=q" in logs["rule_gpu_torchrun"] and "--gpus=1" in logs["rule_gpu_torchrun"]
    assert re.search(r"rlmeta launch: \S*torchrun --standalone --nproc_per_node=2 ", logs["rule_gpu_torchrun"])
    assert re.search(r"rlmeta launch: srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 \S*torchrun --nnodes=1 "
                     r"--nproc_per_node=2 --rdzv_id=\$SLURM_JOB_ID --rdzv_backend=c10d "
                     r"--rdzv_endpoint=\$\(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" \| head -n1\)"
                     rf":{29500 + int(mpi_id) % 1000} ",
                     logs["rule_mpi_torchrun"])


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_two_node_torchrun_rendezvous(fixture_run, slurm_cluster):
    """The multi-node recipe for real: one torchrun agent per node, c10d rendezvous on the first."""
    if slurm_cluster.capacity["nodes"] < 2:
        pytest.skip("cluster has one node (start it with RLMETA_SLURM_NODES=2)")
    run = fixture_run
    assert run.returncode == 0, run.log_tail()
    row = run.jobs_by_rule()["two_node_torchrun"]
    assert row["State"] == "COMPLETED", row
    assert "node=2" in row["AllocTRES"] and "gres/gpu=2" in row["AllocTRES"], row
    call = " ".join(run.sbatch_calls()["two_node_torchrun"].split(" --wrap=")[0].split())
    assert re.search(r" -t 5 --mem 1000 --nodes=2 --requeue --ntasks=2 --cpus-per-task=1 -D \S+ --gres=gpu:1 --gpus=2$",
                     call), call
    import json
    summary = json.loads((run.workdir / "out" / "two_nodes.json").read_text())
    assert summary["world_size"] == 2 and summary["sum"] == 3.0
    assert len(set(summary["hosts"])) == 2, summary  # the two workers ran on two nodes
    steps = sacct_rows(run.run_id, ["JobID", "JobName", "State", "NodeList"], allocations_only=False)
    step = next(r for r in steps if r["JobID"] == f"{row['JobID']}.0")
    assert step["JobName"] == "torchrun" and step["State"] == "COMPLETED" and "," in step["NodeList"], step


def repo_workdir(workdir: Path) -> Path:
    """A work directory that looks like the repository (symlinks to its entries), with its own .snakemake and
    results/."""
    workdir.mkdir()
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name != "results":
            (workdir / entry.name).symlink_to(entry)
    return workdir


FOMAML_CONFIG = ROOT / "tests" / "fixtures" / "slurm_fomaml.yaml"
FOMAML_LOCAL_RULES = ["prepare_math", "split_math_tasks", "build_model", "report_fomaml"]


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_real_workflow_fomaml_on_slurm(slurm_cluster, tmp_path):
    """The real Snakefile with the slurm profile on the tiny FOMAML experiment
    (tests/fixtures/slurm_fomaml.yaml): data, tokenizer/model and report rules run on the
    submit host; train_fomaml (torchrun, 2 workers) and eval_adaptation are SLURM jobs."""
    workdir = repo_workdir(tmp_path / "wf")
    target = "results/math_fomaml/report/report.html"
    # --workflow-profile none: else Snakemake also loads the repository's profiles/default as
    # the implicit "workflow profile", whose keys (config: platform=local, default-resources,
    # resources: gpu=0) override the slurm profile's (gpu capped to 0, no partition).
    # --configfile and the target go in extra_args: run() appends targets right after
    # --configfile/--config, whose nargs="+" would swallow them ("--" keeps them apart).
    run = slurm_cluster.run(workdir / "Snakefile", workdir, timeout=420,
                            extra_args=["--workflow-profile", "none", "--configfile", str(FOMAML_CONFIG), "--", target])
    assert run.returncode == 0, run.log_tail(120)
    assert run.run_id, "no 'SLURM run ID' in the snakemake log"
    assert (workdir / target).exists() and (workdir / "results/math_fomaml/eval/summary.json").exists()

    # one SLURM job per cluster rule, each COMPLETED; the light rules ran on the submit host
    jobs = run.jobs_by_rule()
    assert sorted(jobs) == ["eval_adaptation", "train_fomaml"], run.jobs
    for rule, row in jobs.items():
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", (rule, row)
        assert row["JobName"] == run.run_id
    for rule in FOMAML_LOCAL_RULES:
        assert re.search(rf"^localrule {rule}:$", run.log, re.M), rule

    # train_fomaml: the rule's gpu = meta.nproc = 2 under platform=slurm -> --gpus=2 -> gres/gpu=2
    assert "gres/gpu=2" in jobs["train_fomaml"]["AllocTRES"], jobs["train_fomaml"]
    assert "gres/gpu=1" in jobs["eval_adaptation"]["AllocTRES"], jobs["eval_adaptation"]
    call = " ".join(run.sbatch_calls()["train_fomaml"].split(" --wrap=")[0].split())
    assert re.search(r" --nodes=1 --requeue --cpus-per-task=\d+ -D \S+ --gpus=2$", call), call
    log_dir = workdir / ".snakemake" / "slurm_logs"  # rule_<name>/<wildcards>/<jobid>.log
    slurm_logs = {p.relative_to(log_dir).parts[0]: p.read_text() for p in log_dir.glob("rule_*/**/*.log")}
    assert "rlmeta launch --nproc 2 --nodes 1" in slurm_logs["rule_train_fomaml"]
    # the launcher's command line (the rule sends stderr to its log)
    train_log = (workdir / "results/logs/math_fomaml/train.log").read_text()
    assert re.search(r"^rlmeta launch: \S*torchrun --standalone --nproc_per_node=2 -m rlmeta train-fomaml ",
                     train_log, re.M), train_log[-3000:]
    assert re.search(r"world 2 = 1 task groups? x 2 shards", train_log), train_log[-3000:]  # FSDP2 over both ranks
    steps = sacct_rows(run.run_id, ["JobID", "JobName", "State", "AllocTRES"], allocations_only=False)
    step = next(r for r in steps if r["JobID"] == f"{jobs['train_fomaml']['JobID']}.0")
    assert step["State"] == "COMPLETED" and "gres/gpu=2" in step["AllocTRES"], step
    print(f"real FOMAML workflow under SLURM: {run.seconds:.0f} s")


TRL_CONFIG = ROOT / "tests" / "fixtures" / "slurm_trl.yaml"


@contextmanager
def released_requeues(interval: float = 1.0):
    """While inside: start requeued jobs at once. SLURM holds a requeued job for 120 s (EligibleTime); a real
    cluster waits, the test does not (``scontrol update StartTime=now``, as root). Yields the job ids released."""
    released: list[str] = []
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=10)
            for line in out.stdout.split():
                job, state, reason = line.split("|")
                if state == "PENDING" and reason == "BeginTime":
                    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
                    released.append(job)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield released
    finally:
        stop.set()
        thread.join(timeout=10)


def signal_launcher_until(stopped: Path, log: Path, timeout: float = 400) -> threading.Thread:
    """A thread that finds the job's ``rlmeta launch`` and sends it SIGUSR1 every second until ``stopped`` exists
    (the trainers' interruptions.jsonl): the launcher passes it on to every process under it, as it does itself
    ``RLMETA_SIGNAL_BEFORE`` seconds before the time limit (trainers still loading ignore it, hence the repeats).
    Only once the rule's ``log`` says the launcher supervises the job (its "s left in SLURM job" line): before
    that, SIGUSR1 would terminate a Python still starting (a CI run failed so)."""
    import psutil

    def supervising() -> bool:
        with contextlib.suppress(OSError):
            return "s left in SLURM job" in log.read_text(errors="replace")
        return False

    def launcher():
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            # <python> -m rlmeta launch ... -- train-trl (the rules' shell function), not the rule's bash -c, and
            # only inside a SLURM job: another test worker may be running its own launcher outside SLURM
            if argv[1:4] == ["-m", "rlmeta", "launch"] and "train-trl" in argv:
                with contextlib.suppress(psutil.Error):
                    if "SLURM_JOB_ID" in proc.environ():
                        return proc
        return None

    def loop():
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and not stopped.exists():
                proc = launcher() if supervising() else None
                if proc is not None:
                    with contextlib.suppress(psutil.Error):
                        proc.send_signal(signal.SIGUSR1)
                        thread.sent += 1
                time.sleep(1.0)
        except Exception as e:  # reported by the test
            thread.error = repr(e)

    thread = threading.Thread(target=loop, daemon=True)
    thread.sent, thread.error = 0, None
    thread.start()
    return thread


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_real_workflow_trl_requeue_on_slurm(slurm_cluster, tmp_path, monkeypatch):
    """The real Snakefile under the slurm profile trains gsm8k_grpo_lora with 2 processes (train.distributed.nproc 2:
    one SLURM job, --gpus=2, torchrun with two workers). During its first run the job's launcher gets SIGUSR1
    (what it sends itself RLMETA_SIGNAL_BEFORE seconds before the time limit; the test sends it, so that the run
    is stopped once, whatever the machine's load): both workers checkpoint the same step and exit, rank 0
    requeues the job (scontrol requeue), the requeued job runs the rule again, which resumes from
    that checkpoint and finishes; Snakemake sees one job that completed."""
    workdir = repo_workdir(tmp_path / "wf")
    target = "results/gsm8k_grpo_lora/seed1/train_metrics.parquet"
    train_log = workdir / "results/logs/gsm8k_grpo_lora/train_seed1.log"
    monkeypatch.setenv("RLMETA_SIGNAL_BEFORE", "1")  # the launcher's own timer: 1 s before the 5-minute limit
    with released_requeues() as released:
        sender = signal_launcher_until(workdir / "results/gsm8k_grpo_lora/seed1/checkpoints/interruptions.jsonl",
                                       train_log)
        run = slurm_cluster.run(workdir / "Snakefile", workdir, timeout=540,
                                profile_extra={"set-resources": {"train_trl": {"runtime": 5, "mem_mb": 4000,
                                                                               "cpus_per_task": 2}}},
                                extra_args=["--workflow-profile", "none", "--configfile", str(TRL_CONFIG), "--",
                                            target])
        sender.join(timeout=5)
    assert run.returncode == 0, run.log_tail(60) + "\n--- train log:\n" + (
        train_log.read_text(errors="replace")[-4000:] if train_log.exists() else "(none)")
    assert sender.sent >= 1, sender.error
    jobs = run.jobs_by_rule()
    assert sorted(jobs) == ["train_trl"], run.jobs
    job = jobs["train_trl"]
    assert job["State"] == "COMPLETED" and "gres/gpu=2" in job["AllocTRES"], job
    assert released == [job["JobID"]]  # requeued once (and started again at once)

    seed = workdir / "results/gsm8k_grpo_lora/seed1"
    stops = [json.loads(line) for line in (seed / "checkpoints" / "interruptions.jsonl").read_text().splitlines()]
    assert len(stops) == 1, stops
    stop = stops[0]
    assert (stop["slurm_job_id"], stop["signal"], stop["slurm_restart_count"]) == (job["JobID"], "SIGUSR1", 0)
    assert 0 < stop["step"] < 60
    assert pq.read_table(seed / "train_metrics.parquet").column("step").to_pylist() == list(range(1, 61))
    log = train_log.read_text()  # the second run's
    assert f"resuming results/gsm8k_grpo_lora/seed1/checkpoints/checkpoint-{stop['step']}" in log, log[-3000:]
    assert "torchrun --standalone --nproc_per_node=2 -m rlmeta train-trl" in log
    assert re.search(r"rlmeta launch: \d+ s left in SLURM job \d+: SIGUSR1 to the trainers in \d+ s", log), log[:3000]
    print(f"real TRL workflow under SLURM, requeued at step {stop['step']}: {run.seconds:.0f} s")


@pytest.mark.slow
def test_slurm_profile_is_not_overridden_by_profiles_default(tmp_path):
    """`snakemake --profile profiles/slurm` in the repository must run with platform=slurm."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name != "results":
            (tmp_path / entry.name).symlink_to(entry)
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm",
                          "--", "results/headlines_gspo/seed1234/train_metrics.parquet"],
                         cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "uses backend mlx" in text, text[-2000:]


# --------------------------------------------------------------------------- no cluster needed

def _profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def test_default_profile_is_harmless_as_workflow_profile():
    """Snakemake loads profiles/default for every run and lets its keys win over --profile's."""
    cfg = _profile("default")
    for key in ("config", "default-resources", "resources", "set-resources", "executor", "cores", "jobs"):
        assert key not in cfg, key


@pytest.mark.parametrize("name,platform", [("apple-silicon", "apple-silicon"), ("slurm", "slurm")])
def test_profiles_set_platform_and_rule_resources(name, platform):
    cfg = _profile(name)
    assert f"platform={platform}" in cfg["config"]
    defaults = dict(item.split("=", 1) for item in cfg["default-resources"])
    for key in ("gpu", "nodes", "cpus_per_task", "mem_mb", "runtime"):
        assert key in defaults, (name, key)  # rules may read {resources.<key>} under every profile
    if name != "slurm":
        assert "executor" not in cfg
        assert "gpu=0" in cfg["resources"]


def test_slurm_profile_routes_gpu_rules():
    cfg = _profile("slurm")
    assert cfg["executor"] == "slurm"
    assert "slurm_partition" in dict(item.split("=", 1) for item in cfg["default-resources"])
    for rule in GPU_RULES:
        res = cfg["set-resources"][rule]
        assert res["cpus_per_task"] >= 1 and res["mem_mb"] > 0 and res["runtime"] > 0, rule
        # the training rules set gpu themselves (meta.nproc, train.distributed.nproc); a profile value would
        # override it
        assert ("gpu" not in res) if rule in SELF_GPU_RULES else res["gpu"] >= 1, rule
    assert "train_mlx" not in cfg["set-resources"]


def _multinode_example() -> dict:
    """The commented multi-node train_fomaml entry of profiles/slurm/config.yaml, parsed."""
    text = (SLURM_PROFILE / "config.yaml").read_text()
    m = re.search(r"^  # train_fomaml: +# multi-node.*?\n((?:  #   .*\n)+)", text, re.M)
    assert m, "multi-node example not found"
    body = "\n".join(line[len("  #   "):].split(" #")[0] for line in m.group(1).splitlines())
    return yaml.safe_load(body)


class _Res(dict):
    __getattr__ = dict.__getitem__


def _plugin_sbatch(rule: str, resources: dict) -> str:
    """The sbatch line (without --wrap) plugin 2.8 builds for a rule with these resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Res(resources), threads=1, name=rule, is_group=lambda: False)
    params = {"run_uuid": "RUN", "slurm_logfile": f"LOGDIR/rule_{rule}/%j.log", "comment_str": f"rule_{rule}",
              "account": "", "partition": f" -p {resources['slurm_partition']}", "workdir": "WORKDIR"}
    # the profile's slurm-requeue: true -> sbatch --requeue
    settings = SimpleNamespace(requeue=bool(_profile("slurm").get("slurm-requeue")), no_requeue=False, qos=None,
                               reservation=None)
    call = get_submit_command(job, params, settings=settings) + set_gres_string(job)
    return " ".join(call.split())


def _profile_resources(rule: str, override: dict | None = None) -> dict:
    cfg = _profile("slurm")
    res = {}
    for item in cfg["default-resources"]:
        key, value = item.split("=", 1)
        res[key] = int(value) if value.isdigit() else value
    res.update(cfg["set-resources"].get(rule, {}))
    res.update(override or {})
    return res


def test_plugin_sbatch_line_single_node_gpu_rule():
    # gpu=2: what rules/meta.smk sets for an experiment with meta.nproc 2 under platform=slurm
    line = _plugin_sbatch("train_fomaml", _profile_resources("train_fomaml", {"gpu": 2}))
    assert line == ("sbatch --parsable --job-name RUN --output LOGDIR/rule_train_fomaml/%j.log --export=ALL "
                    "--comment rule_train_fomaml -p gpu -t 720 --mem 64000 --nodes=1 --requeue --cpus-per-task=8 "
                    "-D WORKDIR --gpus=2")
    # gpu=2: what rules/train.smk sets for train.distributed.nproc 2 under platform=slurm
    line = _plugin_sbatch("train_trl", _profile_resources("train_trl", {"gpu": 2}))
    assert line.endswith("-p gpu -t 720 --mem 64000 --nodes=1 --requeue --cpus-per-task=8 -D WORKDIR --gpus=2")
    line = _plugin_sbatch("generate", _profile_resources("generate"))
    assert line.endswith("-p gpu -t 120 --mem 32000 --nodes=1 --requeue --cpus-per-task=8 -D WORKDIR --gpus=1")


def test_plugin_sbatch_line_multinode_example():
    example = _multinode_example()
    assert example["mpi"] == "srun" and example["nodes"] == 2 and example["tasks"] == 2
    line = _plugin_sbatch("train_fomaml", _profile_resources("train_fomaml", {"gpu": 1, **example}))
    assert line == ("sbatch --parsable --job-name RUN --output LOGDIR/rule_train_fomaml/%j.log --export=ALL "
                    "--comment rule_train_fomaml -p gpu -t 720 --mem 128000 --nodes=2 --requeue --ntasks=2 "
                    "--cpus-per-task=16 -D WORKDIR --gres=gpu:4 --gpus=8")
    # without tasks_per_gpu: 0 the plugin would add --ntasks-per-gpu=2 (16 tasks for 8 GPUs)
    example.pop("tasks_per_gpu")
    assert "--ntasks-per-gpu=2" in _plugin_sbatch("train_fomaml", _profile_resources("train_fomaml", example))

    from rlmeta.launch import torchrun_command
    per_node = example["gpu"] // example["nodes"]
    assert torchrun_command("rlmeta", ["train-fomaml"], nproc=per_node, nodes=example["nodes"], module=True).startswith(
        "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=4 ")


@pytest.mark.slow
def test_profile_dry_runs_on_fixture(tmp_path):
    """Every profile parses and plans the fixture workflow (no cluster needed for -n)."""
    for name in ("default", "apple-silicon", "slurm"):
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", str(PROFILES / name),
                              "-s", str(FIXTURE_WF / "Snakefile"), "-d", str(tmp_path / name)],
                             capture_output=True, text=True, env=_env(), timeout=120)
        assert out.returncode == 0, (name, out.stdout[-3000:], out.stderr[-3000:])
        assert "gpu_torchrun" in out.stdout + out.stderr
