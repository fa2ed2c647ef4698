"""TRL GRPO over several processes (issue 12): a real 2-process gloo run through ``rlmeta launch`` (the rule's
command) that learns with the 1-process global batch, the GRPOConfig arguments of each strategy (DDP, FSDP2,
DeepSpeed ZeRO-3) and the exact launch command lines of 1 x 4 and 2 x 4 GPUs, resuming with another process
count, and the one-line errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rlmeta import checkpoints
from rlmeta.cli import main
from rlmeta.launch import HEAD_NODE_EXPR
from rlmeta.rl import trl_trainer as T
from rlmeta.settings import RLJob
from rlmeta.testing.models import assert_opens_in_transformers_and_mlx, toy_write_task

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "data" / "plugin_reward.py"
# the TRL tests' proof task (tests/test_trl_trainer.py), rewarded for the letter "a" by the plugged-in char_share
JOB = {"algorithm": "grpo", "rewards": {"char_share": 1.0}, "reward_params": {"char_share": {"chars": "a"}},
       "train": {"steps": 20, "batch_prompts": 4, "group_size": 8, "learning_rate": 3e-2, "max_new_tokens": 8,
                 "temperature": 1.0, "checkpoint_every": 10, "eval_every": 20, "trl": {"report_to": "none"},
                 "distributed": {"nproc": 2}}}


def job(**distributed) -> RLJob:
    """JOB with a built-in reward (the plugged-in one is loaded only by the subprocesses) and ``distributed``."""
    return RLJob.model_validate({**JOB, "rewards": {"xml_strict": 1.0}, "reward_params": {},
                                 "train": {**JOB["train"], "distributed": {"nproc": 2, **distributed}}})


def launch(out: Path, model: Path, prompts: Path, job_json: dict, nproc: int) -> subprocess.CompletedProcess:
    """The train_trl rule's command line (rules/train.smk), run by hand."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(launch_cmd(out, model, prompts, job_json, nproc), capture_output=True, text=True, env=env,
                          timeout=600)


def launch_cmd(out: Path, model: Path, prompts: Path, job_json: dict, nproc: int) -> list[str]:
    return [sys.executable, "-m", "rlmeta", "launch", "--nproc", str(nproc), "--nodes", "1", "--cpus-per-task", "1",
           "--direct-if-one", "--", "train-trl", "--reward-modules", str(PLUGIN), "--model", str(model),
           "--prompts", str(prompts), "--job", json.dumps(job_json), "--out", str(out / "checkpoints"),
           "--metrics", str(out / "train_metrics.parquet"), "--eval-curve", str(out / "eval_curve.parquet"),
           "--rollouts", str(out / "rollouts"), "--seed", "0"]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl2")
    model, prompts = toy_write_task(root, ["cats", "dogs", "food", "balls"])
    out = root / "run"
    r = launch(out, model, prompts, JOB, nproc=2)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, model, prompts, out, r.stderr


# (a) a real 2-process run ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_learn_with_the_same_global_batch(two_procs):
    _, _, _, out, log = two_procs
    assert "torchrun --standalone --nproc_per_node=2 -m rlmeta train-trl" in log
    metrics = pq.read_table(out / "train_metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, 21))  # rank 0 writes each step once
    assert log.count("step 20/20 ") == 1  # ... and prints it once
    rollouts = pq.read_table(out / "rollouts")
    # every rank's share gathered: 4 prompts x 8 completions per step, as with one process
    counts = pc.value_counts(rollouts.column("step")).to_pylist()
    assert sorted(c["counts"] for c in counts) == [32] * 20
    assert rollouts.num_rows == 640
    per_step = rollouts.group_by("step").aggregate([("reward", "mean")]).sort_by("step").to_pylist()
    first, last = per_step[0]["reward_mean"], per_step[-1]["reward_mean"]
    assert first < 0.05 and last > 0.3  # the toy reward rises (1 process: 0.012 -> 1.0, tests/test_trl_trainer.py)
    curve = pq.read_table(out / "eval_curve.parquet").to_pylist()
    assert [r["step"] for r in curve] == [0, 20]
    assert curve[-1]["reward"] >= curve[0]["reward"] + 0.3  # held-out reward beats the base's


@pytest.mark.slow
def test_two_process_checkpoints_are_written_once_and_portable(two_procs):
    _, _, _, out, _ = two_procs
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-10", "checkpoint-20"]
    marker = checkpoints.marker(out / "checkpoints" / "checkpoint-20")
    assert marker["world_size"] == 2 and marker["spec"]["job"]["train"]["distributed"]["nproc"] == 2
    rng = sorted(p.name for p in (out / "checkpoints" / "checkpoint-20").glob("rng_state*"))
    assert rng == ["rng_state_0.pth", "rng_state_1.pth"]  # each rank's sampling stream, for an exact resume
    assert not list((out / "checkpoints").glob(".staging-*"))
    assert_opens_in_transformers_and_mlx(out / "checkpoints" / "final", [{"role": "user", "content": "write cats 0"}])


@pytest.mark.slow
def test_two_processes_share_dynamic_sampling(tmp_path):
    """DAPO's dynamic sampling over 2 processes: each fills its own 2 groups, both draw while either is short
    (one all-reduce per draw), and the steps train only on groups with a reward spread."""
    model, prompts = toy_write_task(tmp_path, ["cats", "dogs", "food", "balls"])
    j = json.loads(json.dumps(JOB))
    j["train"].update(steps=6, dynamic_sampling=2, max_new_tokens=3, eval_every=None)
    r = launch(tmp_path / "run", model, prompts, j, nproc=2)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = pq.read_table(tmp_path / "run" / "train_metrics.parquet").to_pylist()
    rollouts = pq.read_table(tmp_path / "run" / "rollouts").to_pylist()
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert any(m["dynamic_extra_batches"] > 0 for m in metrics)  # short 3-token completions: "a" is rare at first
    for step, m in enumerate(metrics):
        rows = [x for x in rollouts if x["step"] == step]
        assert 0 <= m["dynamic_extra_batches"] <= 2
        # both processes' kept groups, gathered (a process that kept none trains on its first 2 groups)
        assert 8 * m["dynamic_groups_kept"] <= len(rows) <= 32
        groups: dict = {}
        for x in rows:
            groups.setdefault((x["group"]), []).append(x["reward"])
        assert len(groups) == len(rows) // 8
        if m["dynamic_groups_kept"] == 4:
            assert m["zero_std_frac"] == 0.0
            assert all(max(v) > min(v) for v in groups.values())


def test_sharded_checkpoints_resume_only_with_their_layout(tmp_path):
    spec = {"model": "m", "seed": 0, "job": job(strategy="fsdp").model_dump(mode="json")}
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    checkpoints.write_marker(folder, step=5, spec=spec, backend="torch", world_size=2)
    assert T._resume_checkpoint(tmp_path, spec, world=2) == str(folder)
    with pytest.raises(SystemExit, match=r"written by 2 process\(es\) with strategy fsdp; resume it with those"):
        T._resume_checkpoint(tmp_path, spec, world=4)
    ddp = {**spec, "job": job().model_dump(mode="json")}
    with pytest.raises(SystemExit, match="strategy fsdp"):
        T._resume_checkpoint(tmp_path, ddp, world=2)
    other = {**spec, "seed": 1}  # another spec (not only train.distributed): start again
    assert T._resume_checkpoint(tmp_path, other, world=2) is None and not folder.exists()


# (b) GRPOConfig arguments per strategy -------------------------------------------------------------------------

def test_global_batch_is_split_between_processes(tmp_path):
    for world, per_device in [(1, 32), (2, 16), (4, 8), (8, 4)]:
        k = T.grpo_config_kwargs(job(nproc=world), tmp_path, cuda=False, world=world)
        assert (k["per_device_train_batch_size"], k["num_generations"], k["gradient_accumulation_steps"]) == (
            per_device, 8, 1)
    with pytest.raises(SystemExit, match="3 processes cannot share the global batch .* = 32 equally"):
        T.grpo_config_kwargs(job(nproc=2), tmp_path, cuda=False, world=3)
    c = T.grpo_config(job(nproc=2), tmp_path)  # outside torchrun: one process
    assert c.per_device_train_batch_size == 32 and c.generation_batch_size == 32


def test_ddp_fsdp_zero3_arguments(tmp_path):
    ddp = T.grpo_config_kwargs(job(), tmp_path, cuda=True, world=2)
    assert "fsdp" not in ddp and "deepspeed" not in ddp and ddp["activation_checkpointing"] and ddp["bf16"]
    cpu = T.grpo_config_kwargs(job(), tmp_path, cuda=False, world=2)
    assert not cpu["activation_checkpointing"] and cpu["use_cpu"]

    fsdp = T.grpo_config_kwargs(job(strategy="fsdp", nproc=8), tmp_path, cuda=True, world=8)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"] == {
        "version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": True, "activation_checkpointing": True, "cpu_offload": False}
    assert not fsdp["activation_checkpointing"]  # FSDP's own, not a second all-gather
    no_ckpt = job(strategy="fsdp", cpu_offload=True)
    no_ckpt = no_ckpt.model_copy(update={"train": no_ckpt.train.model_copy(update={"gradient_checkpointing": False})})
    off = T.grpo_config_kwargs(no_ckpt, tmp_path, cuda=True, world=2)
    assert off["fsdp_config"]["activation_checkpointing"] is False and off["fsdp_config"]["cpu_offload"] is True

    assert T.zero3_config() == {
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    assert T.zero3_config(cpu_offload=True)["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu", "pin_memory": True}


def test_fsdp_builds_a_real_trl_config(tmp_path):
    """transformers accepts the FSDP2 arguments (its own checks run in TrainingArguments.__post_init__)."""
    from trl import GRPOConfig

    c = GRPOConfig(**T.grpo_config_kwargs(job(strategy="fsdp"), tmp_path, cuda=True, world=2) | {"use_cpu": True,
                                                                                                 "bf16": False})
    assert c.fsdp_config["version"] == 2 and c.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"


def test_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="^rlmeta train-trl: train.distributed.strategy fsdp needs CUDA GPUs"):
        T.grpo_config_kwargs(job(strategy="fsdp"), tmp_path, cuda=False, world=2)
    with pytest.raises(SystemExit, match="zero3 needs CUDA GPUs"):
        T.grpo_config_kwargs(job(strategy="zero3"), tmp_path, cuda=False, world=2)
    with pytest.raises(ValueError, match=r"distributed.nproc 3 must divide the global batch .* = 4 x 8 = 32"):
        job(nproc=3)
    with pytest.raises(ValueError, match="the MLX trainer runs in one process"):
        RLJob.model_validate({**job().model_dump(), "backend": "mlx"})


# (c) the command lines ---------------------------------------------------------------------------------------

TRL_ARGS = ["train-trl", "--model", "m", "--out", "o"]


def dry(capsys, *argv) -> str:
    assert main(["launch", *argv, "--torchrun", "torchrun", "--dry-run", "--", *TRL_ARGS]) == 0
    return capsys.readouterr().out.strip()


def test_command_lines_one_and_two_nodes(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RLMETA_TORCHRUN_PORT", raising=False)
    assert dry(capsys, "--nproc", "4", "--nodes", "1", "--direct-if-one") == (
        "torchrun --standalone --nproc_per_node=4 -m rlmeta train-trl --model m --out o")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert dry(capsys, "--nproc", "8", "--nodes", "2", "--cpus-per-task", "8", "--direct-if-one") == (
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=8 torchrun --nnodes=2 --nproc_per_node=4 "
        f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint={HEAD_NODE_EXPR}:29742 "
        "-m rlmeta train-trl --model m --out o")
    monkeypatch.delenv("SLURM_JOB_ID")
    one = dry(capsys, "--nproc", "0", "--cpu-procs", "1", "--direct-if-one")
    assert one == f"{sys.executable} -m rlmeta train-trl --model m --out o"
    assert dry(capsys, "--nproc", "0", "--cpu-procs", "2", "--direct-if-one") == (
        "torchrun --standalone --nproc_per_node=2 -m rlmeta train-trl --model m --out o")


# (d) vLLM ----------------------------------------------------------------------------------------------------

def vllm_job(**vllm) -> RLJob:
    return RLJob.model_validate({**job().model_dump(), "train": {**job().train.model_dump(), "trl": {
        "report_to": "none", "vllm": vllm}}})


def test_vllm_arguments_and_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="^rlmeta train-trl: train.trl.vllm needs CUDA GPUs .*; drop train.trl.vllm"):
        T.grpo_config_kwargs(vllm_job(), tmp_path, cuda=False, world=2)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit, match=r"needs vllm: pip install 'rlmeta\[vllm\]'"):
        T.grpo_config_kwargs(vllm_job(), tmp_path, cuda=True, world=2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    k = T.grpo_config_kwargs(vllm_job(gpu_memory_utilization=0.4, tensor_parallel_size=2), tmp_path, cuda=True,
                             world=2)
    assert {n: v for n, v in k.items() if n.startswith(("use_vllm", "vllm_"))} == {
        "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.4,
        "vllm_tensor_parallel_size": 2, "vllm_max_model_length": None, "vllm_enable_sleep_mode": False}
    s = T.grpo_config_kwargs(vllm_job(mode="server", port=8123), tmp_path, cuda=True, world=2)
    assert (s["vllm_mode"], s["vllm_server_host"], s["vllm_server_port"]) == ("server", "127.0.0.1", 8123)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 must divide distributed.nproc 2"):
        vllm_job(tensor_parallel_size=4)
    with pytest.raises(ValueError, match="server_gpus 3 must be a multiple of vllm.tensor_parallel_size 2"):
        vllm_job(mode="server", server_gpus=3, tensor_parallel_size=2)


def test_vllm_server_mode_command_line(capsys, monkeypatch):
    """4 GPUs: the first serves (trl vllm-serve), the other 3 train under torchrun; the server stops with the job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the ids SLURM gave the job
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RLMETA_TORCHRUN_PORT", raising=False)
    line = dry(capsys, "--nproc", "3", "--vllm-serve-gpus", "1", "--vllm-model", "/models/qwen3", "--trl", "trl",
               "--direct-if-one")
    assert line == (
        "CUDA_VISIBLE_DEVICES=4 trl vllm-serve --model /models/qwen3 --tensor-parallel-size 1 --data-parallel-size 1 "
        "--host 127.0.0.1 --port 8000 & vllm_pid=$!; trap 'kill $vllm_pid 2>/dev/null' EXIT; "
        "CUDA_VISIBLE_DEVICES=5,6,7 torchrun --standalone --nproc_per_node=3 -m rlmeta train-trl --model m --out o")
    line = dry(capsys, "--nproc", "2", "--vllm-serve-gpus", "2", "--vllm-tensor-parallel", "2", "--vllm-port", "8123",
               "--vllm-max-model-len", "4096", "--vllm-model", "/m", "--trl", "trl")
    assert line.startswith("CUDA_VISIBLE_DEVICES=4,5 trl vllm-serve --model /m --tensor-parallel-size 2 "
                           "--data-parallel-size 1 --host 127.0.0.1 --port 8123 --max-model-len 4096 & ")
    assert line.endswith("CUDA_VISIBLE_DEVICES=6,7 torchrun --standalone --nproc_per_node=2 -m rlmeta train-trl "
                         "--model m --out o")
    with pytest.raises(SystemExit):
        dry(capsys, "--nproc", "4", "--vllm-serve-gpus", "1", "--vllm-model", "/m")
    assert "needs 1 serving + 4 training GPUs, 4 visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dry(capsys, "--nproc", "8", "--nodes", "2", "--vllm-serve-gpus", "1", "--vllm-model", "/m")
    assert "the vLLM server mode runs on one node" in capsys.readouterr().err


# (e) the rule -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rule_asks_slurm_for_training_and_serving_gpus(tmp_path):
    """Under platform=slurm the train_trl job holds nproc training GPUs plus vLLM's serving ones (sbatch --gpus),
    and its command starts the server; on this machine (platform local) it holds no GPU and nproc cores."""
    from rlmeta.testing.workflow import snakemake

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"run_experiments": ["gsm8k_grpo_lora"], "experiments": {
        "gsm8k_grpo_lora": {"train": {"distributed": {"nproc": 2}, "trl": {"vllm": {"mode": "server"}}}}}}))
    args = ["-n", "-p", "--cores", "2", "--configfile", str(cfg), "--forcerun", "train_trl", "--config",
            f"results={tmp_path}/r"]
    slurm = snakemake([*args, "platform=slurm"])
    assert slurm.returncode == 0, slurm.stderr[-3000:]
    job = slurm.stdout.split("rule train_trl:")[1].split("\n\n")[0]
    assert "gpu=3, nodes=1" in job
    assert re.search(r"Shell command: rlmeta launch --nproc 2 --nodes 1 --cpus-per-task 1 --direct-if-one "
                     r"--vllm-serve-gpus 1 --vllm-model \S+/warmstart/\S+ --vllm-tensor-parallel 1 --vllm-port 8000 "
                     r"-- train-trl ", job), job
    local = snakemake([*args, "platform=local"])
    assert local.returncode == 0, local.stderr[-3000:]
    job = local.stdout.split("rule train_trl:")[1].split("\n\n")[0]
    assert "gpu=0" in job and "threads: 2" in job


# (f) the pre-timeout signal -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_signal_checkpoints_the_step_and_a_rerun_resumes(two_procs, tmp_path):
    """SIGUSR1 to every process of a running 2-process launch (what rlmeta launch does before a SLURM time limit):
    both ranks stop after the same step, checkpoint it and exit; one process (ddp: another count may resume) then
    resumes from that checkpoint, keeps the rows before it and finishes."""
    import signal
    import time

    _, model, prompts, _, _ = two_procs
    out = tmp_path / "sig"
    slow = {**JOB, "train": {**JOB["train"], "steps": 12, "checkpoint_every": 100}}
    cmd = launch_cmd(out, model, prompts, slow, nproc=2)
    log = out / "log.txt"
    out.mkdir()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        deadline = time.time() + 300
        while "step 3/12 " not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # the launcher (exec'd into torchrun's agent) and both workers (torchrun starts them in sessions of their
        # own, so not a killpg: SLURM signals every process of the step)
        import psutil

        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) != 0
    text = log.read_text()
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1, text[-3000:]
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < 12 and checkpoints.is_complete(saved[0])
    assert f"stopped at step {step} on SIGUSR1: {saved[0]} written; run the step again to resume" in text
    assert "exitcode  : 75" in text  # torchrun's report of the workers' EXIT_REQUEUE
    assert not (out / "checkpoints" / "final").exists() and not (out / "train_metrics.parquet").exists()

    one = {**slow, "train": {**slow["train"], "distributed": {"nproc": 1}}}
    r = launch(out, model, prompts, one, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchrun" not in r.stderr.splitlines()[0]  # one process: the step itself (--direct-if-one)
    assert f"resuming {saved[0]}" in r.stderr and "(written by 2 processes) with 1" in r.stderr
    rows = pq.read_table(out / "train_metrics.parquet").to_pylist()
    assert [row["step"] for row in rows] == list(range(1, 13))
    kept = pq.read_table(saved[0] / "train_metrics.parquet").to_pylist()  # the rows the checkpoint holds
    assert [row["loss"] for row in rows[:step]] == [row["loss"] for row in kept[:step]]
