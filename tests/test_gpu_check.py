"""benchmarks/gpu_check.py: exits 0 with {"cuda": false} without a GPU, and its --cpu-smoke runs the TRL and
FOMAML (FSDP2, forced process group) sections on a tiny model on the CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, cwd: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p, json.loads(p.stdout.strip().splitlines()[-1])


def test_without_cuda_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the check would run for real")
    p, last = _run(cwd=tmp_path, timeout=120)
    assert last == {"cuda": False, "skipped": "no CUDA device"}
    assert "no CUDA device" in p.stdout
    assert not list(tmp_path.iterdir())  # nothing written without --out or a run


def test_helpers():
    gc = _module()
    assert gc.spec_peak("NVIDIA H200") == gc.spec_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert gc.spec_peak("NVIDIA GH200 480GB") == 989.4 and gc.spec_peak("Some GPU") is None
    pins = gc.pinned_versions()
    assert pins["trl"] and pins["pydantic-core"]
    assert gc.dist_name("yaml") == "pyyaml"
    r = gc.mfu(2e12, 2.0, peak_tflops=4.0, spec_tflops=None)
    assert r == {"model_tflops": 1.0, "mfu_measured_peak": 0.25, "mfu_spec_peak": None}
    res = {"cuda": True, "cpu_smoke": False, "gpu": "X", "spec_tflops": 1.0, "missing": [], "wall_s": 1.0,
           "model": {"n_params": 5}, "sections": {"peak": {"peak_tflops": 2.0}, "trl_hf": {"tokens_per_s": 3.0,
                                                   "steps": [1, 2]}, "trl_vllm": {"skipped": "missing vllm"}}}
    s = gc.summary(res)
    assert s["trl_hf"] == {"tokens_per_s": 3.0} and s["trl_vllm"] == {"skipped": "missing vllm"}
    assert "peak" not in s and s["n_params"] == 5


@pytest.mark.slow
def test_cpu_smoke(tmp_path):
    _, last = _run("--cpu-smoke", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=900)
    assert last["cuda"] is False and last["cpu_smoke"] is True and last["n_params"] > 0
    assert last["trl_hf"]["tokens_per_s"] > 0, last
    assert last["fomaml"]["tokens_per_s"] > 0, last
    assert last["fomaml"]["backend"] == "gloo" and last["fomaml"]["fsdp2"] is True
    assert last["fomaml"]["fsdp_units"] == "model"  # auto on the CPU
    assert last["trl_hf"]["mfu_measured_peak"] > 0 and last["fomaml"]["mfu_measured_peak"] > 0
    assert "skipped" in last["trl_vllm"]
    full = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert full["sections"]["trl_hf"]["generated_tokens"] > 0 and full["sections"]["trl_hf"]["trained_tokens"] > 0
    assert full["sections"]["fomaml"]["train_tokens"] > 0
    assert {"build.log", "trl_hf.log", "fomaml.log"} <= {p.name for p in (tmp_path / "out" / "logs").iterdir()}
