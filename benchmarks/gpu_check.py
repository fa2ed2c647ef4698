"""GPU check: one TRL GRPO step (HF generation, then vLLM colocate) and one FOMAML outer step (FSDP2 over NCCL)
on a Qwen3-0.6B-shaped model with random weights: tokens/s, peak GPU memory, model FLOP utilisation.

The model (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, SwiGLU 3072, tied embeddings) is built
here from the bundled real Qwen tokenizer (resources/qwen-tokenizer; no hub), saved in bf16 to a temporary folder
that TRL and vLLM load by path. Sections, each a subprocess with its own time box (a failure, a timeout or a
missing package is reported and the next section runs):

- ``peak``: a large bf16 GEMM, the measured peak FLOP/s that MFU is reported against (and against the spec peak,
  989 TFLOP/s dense bf16 on an H100/H200);
- ``trl_hf``: ``rlmeta.rl.trl_trainer.train_trl`` (the workflow's TRL path), 8 prompts x 8 completions, 128 new
  tokens, 2 steps (the first a warm-up), bf16 autocast, HF ``generate``;
- ``fomaml``: ``rlmeta.meta.fomaml.train`` under ``rlmeta launch`` (torchrun), 2 outer steps, with the process
  group (NCCL) and FSDP2 ``fully_shard`` forced on even for world size 1 (the trainer itself skips both when
  WORLD_SIZE is 1), bf16 mixed precision;
- ``trl_vllm``: as ``trl_hf`` with ``train.trl.vllm: {mode: colocate}`` (needs vllm).

Timed step: tokens/s = (generated + trained tokens) / step seconds for TRL (trained = prompt + completion tokens
of the update), ``tokens / step_seconds`` of train_metrics for FOMAML; model FLOPs = 6 N per trained token +
2 N per forward-only (generated, or FOMAML's pre-adaptation query) token, N = the model's parameters (tied
embeddings once; attention-score FLOPs and activation recomputation not counted). Peak memory is
``torch.cuda.max_memory_allocated`` of the section's process (vLLM's KV cache included).

Without a CUDA device it prints that and exits 0 (``{"cuda": false, "skipped": "no CUDA device"}``).
``--cpu-smoke`` runs the same sections on a tiny Qwen3 (same tokenizer) on the CPU: gloo, float32, 1 step,
no vLLM. It checks imports first and prints the missing packages with the ``pip download`` line for their
pinned wheels (requirements.lock). Writes ``gpu_check.json`` and per-section logs to ``--out`` (default
$OUT, else ./gpu_check_out); prints a table, then as the LAST line one JSON object.

    python benchmarks/gpu_check.py [--out DIR] [--budget 330] [--sections peak,trl_hf,fomaml,trl_vllm]
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SPEC_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.1, "L4": 121.0}
"""Dense bf16 tensor-core peak (TFLOP/s, spec sheets, SXM parts) by GPU name."""

QWEN3_06B = dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)

# section -> (packages it imports, seconds it may take at most on the GPU / in the CPU smoke)
CORE = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "pydantic", "pydantic_core",
        "annotated_types", "typing_inspection", "yaml"]
SECTIONS = {
    "build": (CORE, 120, 120),
    "peak": (["torch"], 60, 60),
    "trl_hf": ([*CORE, "trl", "datasets", "accelerate"], 180, 300),
    "fomaml": (CORE, 150, 300),
    "trl_vllm": ([*CORE, "trl", "datasets", "accelerate", "vllm"], 240, 0),
}
ORDER = ["peak", "trl_hf", "fomaml", "trl_vllm"]  # vLLM last: the most likely to fail, the slowest to start
OPTIONAL = ["peft"]  # the TRL path imports it only for LoRA: reported, not required
DIST_NAME = {"yaml": "pyyaml", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
             "typing_inspection": "typing-inspection"}
COMPILED = {"pydantic_core", "yaml", "pyarrow", "numpy", "pandas", "tokenizers", "safetensors", "xxhash", "regex",
            "charset_normalizer", "psutil", "hf_xet", "markupsafe", "torch", "vllm"}
"""Packages with platform wheels: ``pip download`` them for the device's Python and platform."""


# ---------------------------------------------------------------- environment


def pinned_versions() -> dict[str, str]:
    """name -> version of requirements.lock (normalised names)."""
    lock = ROOT / "requirements.lock"
    pins = {}
    if lock.exists():
        for line in lock.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
            if m:
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def dist_name(module: str) -> str:
    return DIST_NAME.get(module, module)


def version(module: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name(module))
    except importlib.metadata.PackageNotFoundError:
        return None


IMPORT_PROBE = """
import importlib, json, sys
out = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
        out[m] = None
    except ModuleNotFoundError as e:
        out[m] = {"missing": e.name or m}
    except Exception as e:
        out[m] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(out))
"""


def check_imports(env: dict | None = None, timeout: float = 180) -> dict:
    """Import each section's packages in a subprocess: the importable ones with their versions, the missing
    ones (a package itself, or a dependency it lacks, named after what failed) and the pip lines for them."""
    mods = sorted({m for pkgs, _, _ in SECTIONS.values() for m in pkgs} | set(OPTIONAL))
    try:
        p = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *mods], capture_output=True, text=True,
                           env=env or _env(), timeout=timeout)
        probe = json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):  # fall back to presence only
        probe = {m: None if importlib.util.find_spec(m) else {"missing": m} for m in mods}
    missing, broken = [], {}
    for m in mods:
        r = probe.get(m)
        if r is None:
            continue
        if "missing" in r:
            dep = r["missing"].split(".")[0]
            missing += [x for x in dict.fromkeys((m, dep)) if x not in missing]
            if dep != m:
                broken[m] = f"needs {dep}"
        else:
            missing += [m] if m not in missing else []
            broken[m] = r["error"]
    pins = pinned_versions()

    def req(m):
        d = dist_name(m)
        v = pins.get(d.lower().replace("_", "-"))
        return f"{d}=={v}" if v else d

    wheels = [m for m in missing if m not in broken or broken[m].startswith("needs")]
    pure = [req(m) for m in wheels if m not in COMPILED]
    binary = [req(m) for m in wheels if m in COMPILED and m not in ("torch", "vllm")]
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    hint = []
    if pure:
        hint.append("pip download --no-deps -d .bench-deps/gpu-wheels " + " ".join(pure))
    if binary:
        hint.append(f"pip download --no-deps --only-binary=:all: --python-version {py} --implementation cp "
                    f"--platform manylinux2014_{platform.machine()} -d .bench-deps/gpu-wheels " + " ".join(binary))
    if "vllm" in missing:
        hint.append(f"vllm: a CUDA build matching torch {version('torch')} (TRL supports 0.22-0.31); too big to carry")
    if pure or binary:
        hint.append("carry .bench-deps/gpu-wheels and pass --wheels .bench-deps/gpu-wheels (installed with "
                    "pip --no-deps --target into the work folder, for the missing packages only)")
    return {"versions": {m: version(m) for m in mods if probe.get(m) is None}, "missing": missing,
            "broken": broken, "pip": hint}


def install_wheels(wheels: Path, target: Path) -> list[str]:
    """``pip install --no-deps --target`` the wheels in ``wheels`` whose distribution is not installed here."""
    todo = []
    for whl in sorted(wheels.glob("*.whl")):
        dist = whl.name.split("-")[0]
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            todo.append(whl)
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        # several builds of one package (one per Python version): pip picks the one this interpreter takes
        names = sorted({w.name.split("-")[0] for w in todo})
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links", str(wheels),
               "--target", str(target), "--quiet", "--disable-pip-version-check", *names]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"[gpu_check] pip install from {wheels} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return names if not p.returncode else []
    return []


def section_missing(name: str, imports: dict) -> list[str]:
    return [m for m in SECTIONS[name][0] if m in imports["missing"]]


# ---------------------------------------------------------------- model and data (run inside sections)


def _paths():
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def build_model(out: Path, shape: dict, cuda: bool) -> dict:
    """A Qwen3 of ``shape`` with random weights (seed 0) and the bundled Qwen tokenizer, saved to ``out``
    (bf16 on CUDA like the released Qwen3 checkpoints, float32 in the CPU smoke)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from rlmeta.models.build import _add_legacy_keys, qwen3_config
    from rlmeta.models.tokenizer import EOS_TOKEN, PAD_TOKEN, load_qwen_tokenizer, save_tokenizer
    from rlmeta.settings import ModelBuild

    tok = load_qwen_tokenizer()
    build = ModelBuild(tokenizer="qwen", hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                       num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
                       intermediate_size=shape["intermediate_size"], max_position_embeddings=4096)
    config = qwen3_config(build, tok)
    config.head_dim = shape["head_dim"]
    dtype = torch.bfloat16 if cuda else torch.float32
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    eos, pad = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad).save_pretrained(out)
    _add_legacy_keys(out / "config.json")
    n = sum(p.numel() for p in model.parameters())  # tied embeddings: one tensor, counted once
    emb = model.get_input_embeddings().weight.numel()
    return {"n_params": n, "n_params_non_embedding": n - emb, "vocab_size": config.vocab_size,
            "dtype": str(dtype).removeprefix("torch."), **shape}


def write_prompts(path: Path, n: int) -> Path:
    """A prompts table of ``n`` train prompts: the first bundled GSM8K questions in the xml_cot format."""
    import pyarrow as pa

    from rlmeta.io import write_table
    from rlmeta.prompts import xml_cot
    from rlmeta.tables import PROMPTS

    lines = (ROOT / "resources" / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    rows = [dict(prompt_id=f"p{i}", experiment="gpu_check", item_id=f"i{i}", task="gsm8k", split="train",
                 prompt=xml_cot({"question": json.loads(x)["question"]}), reference=None, reference_completion=None)
            for i, x in enumerate(lines)]
    write_table(path, pa.Table.from_pylist(rows, schema=PROMPTS))
    return path


def write_tasks(work: Path) -> tuple[Path, list[str]]:
    """The bundled MATH sample split into subject tasks; the training subjects (the default test subjects out)."""
    from rlmeta.data.math_problems import prepare_math, split_math_tasks
    from rlmeta.settings import MATH_SUBJECTS, MetaSettings

    prepare_math(str(ROOT / "resources" / "math"), work / "math")
    split_math_tasks(work / "math" / "train.parquet", list(MATH_SUBJECTS), 0.30, 0.40, 1234, work / "math_tasks")
    test = set(MetaSettings().test_subjects)
    return work / "math_tasks", [s for s in MATH_SUBJECTS if s not in test]


def cuda_peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    gib = 2**30
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2)}


def mfu(flops: float, seconds: float, peak_tflops: float | None, spec_tflops: float | None) -> dict:
    achieved = flops / seconds / 1e12
    return {"model_tflops": float(f"{achieved:.4g}"),
            "mfu_measured_peak": round(achieved / peak_tflops, 4) if peak_tflops else None,
            "mfu_spec_peak": round(achieved / spec_tflops, 4) if spec_tflops else None}


# ---------------------------------------------------------------- sections (each in its own process)


def sec_build(ctx: dict) -> dict:
    shape = TINY if ctx["smoke"] else QWEN3_06B
    t0 = time.perf_counter()
    info = build_model(Path(ctx["work"]) / "model", shape, not ctx["smoke"])
    return {**info, "seconds": round(time.perf_counter() - t0, 1)}


def sec_peak(ctx: dict) -> dict:
    """Measured peak: the best of a few timed runs of an n x n x n GEMM (bf16 on CUDA, float32 on the CPU)."""
    import torch

    cuda = not ctx["smoke"]
    n, reps = (8192, 50) if cuda else (512, 5)
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for i in range(6):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first run warms up
            best = min(best, (time.perf_counter() - t0) / reps)
    tflops = 2 * n**3 / best / 1e12
    return {"gemm_n": n, "dtype": str(dtype).removeprefix("torch."), "peak_tflops": float(f"{tflops:.4g}")}


def _trl(ctx: dict, vllm: bool) -> dict:
    import pyarrow.parquet as pq
    import torch

    from rlmeta.rl.trl_trainer import train_trl
    from rlmeta.settings import RLJob, WandbSettings

    smoke, work = ctx["smoke"], Path(ctx["work"])
    prompts, group, new_tokens, steps = (2, 2, 8, 1) if smoke else (8, 8, 128, 2)
    trl = {"report_to": "none", **({"vllm": {"mode": "colocate"}} if vllm else {})}
    job = RLJob.model_validate({"algorithm": "grpo", "backend": "torch", "rewards": {"xml_count": 1.0}, "train": {
        "steps": steps, "batch_prompts": prompts, "group_size": group, "max_new_tokens": new_tokens,
        "learning_rate": 1e-6, "temperature": 1.0, "checkpoint_every": 10_000, "eval_every": None,
        "log_rollouts": False, "trl": trl}})
    name = "trl_vllm" if vllm else "trl_hf"
    path = write_prompts(work / f"{name}_prompts.parquet", prompts)
    metrics = work / f"{name}_metrics.parquet"
    t0 = time.perf_counter()
    train_trl(work / "model", path, job, work / name, metrics, WandbSettings(mode="disabled"), seed=0)
    wall = time.perf_counter() - t0
    rows = pq.read_table(metrics).to_pylist()
    last, before = rows[-1], (rows[-2]["tokens"] if len(rows) > 1 else 0)
    trained = int(last["tokens"] - before)
    generated = last["completion_len_mean"] * prompts * group
    secs = last["step_seconds"]
    n = ctx["model"]["n_params"]
    return {"tokens_per_s": round((generated + trained) / secs, 1), "generated_tokens": round(generated),
            "trained_tokens": trained, "step_s": round(secs, 3), "steps": [round(r["step_seconds"], 3) for r in rows],
            "batch": f"{prompts}x{group}", "max_new_tokens": new_tokens, "wall_s": round(wall, 1),
            **mfu(6 * n * trained + 2 * n * generated, secs, ctx.get("peak_tflops"), ctx.get("spec_tflops")),
            **cuda_peak_memory(), "bf16": bool(torch.cuda.is_available())}


def sec_trl_hf(ctx: dict) -> dict:
    return _trl(ctx, vllm=False)


def sec_trl_vllm(ctx: dict) -> dict:
    return _trl(ctx, vllm=True)


def sec_fomaml(ctx: dict) -> dict:
    """``rlmeta launch`` (torchrun, 1 process) of this script's ``--fomaml-worker``."""
    import pyarrow.parquet as pq

    from rlmeta.settings import MetaSettings

    smoke, work = ctx["smoke"], Path(ctx["work"])
    tasks, subjects = write_tasks(work)
    meta = (dict(outer_steps=1, meta_batch_size=2, inner_steps=1, support_batch=2, query_batch=2, max_seq_len=256)
            if smoke else
            dict(outer_steps=2, meta_batch_size=4, inner_steps=2, support_batch=8, query_batch=8, max_seq_len=384))
    meta = MetaSettings.model_validate({**meta, "checkpoint_every": 10_000, "nproc": 1})
    cfg = {"model": str(work / "model"), "tasks": str(tasks), "subjects": subjects,
           "meta": meta.model_dump(mode="json"),
           "out": str(work / "fomaml" / "final"), "metrics": str(work / "fomaml" / "m.parquet"),
           "result": str(work / "fomaml" / "worker.json")}
    (work / "fomaml").mkdir(parents=True, exist_ok=True)
    cfg_path = work / "fomaml" / "worker_cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    launch = ["--nproc", "0", "--cpu-procs", "1"] if smoke else ["--nproc", "1"]
    cmd = [sys.executable, "-m", "rlmeta", "launch", *launch, "--", str(Path(__file__).resolve()),
           "--fomaml-worker", str(cfg_path)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(), cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"rlmeta launch ... train-fomaml worker exited {p.returncode}")
    worker = json.loads(Path(cfg["result"]).read_text())
    rows = pq.read_table(cfg["metrics"]).to_pylist()
    last = rows[-1]
    secs, tokens, train_tokens = last["step_seconds"], int(last["tokens"]), int(last["train_tokens"])
    n = ctx["model"]["n_params"]
    flops = 6 * n * train_tokens + 2 * n * (tokens - train_tokens)
    return {"tokens_per_s": round(tokens / secs, 1), "tokens": tokens, "train_tokens": train_tokens,
            "step_s": round(secs, 3), "steps": [round(r["step_seconds"], 3) for r in rows], "wall_s": round(wall, 1),
            "loss": last["loss"], "meta_batch": meta.meta_batch_size, "inner_steps": meta.inner_steps,
            "batches": f"{meta.support_batch}/{meta.query_batch}", "max_seq_len": meta.max_seq_len,
            **mfu(flops, secs, ctx.get("peak_tflops"), ctx.get("spec_tflops")), **worker}


def fomaml_worker(cfg_path: str) -> int:
    """Under torchrun: ``rlmeta.meta.fomaml.train`` with a process group and FSDP2 even for one process."""
    _paths()
    import torch
    import torch.distributed as dist

    import rlmeta.meta.fomaml as fomaml
    from rlmeta.meta import distributed as D
    from rlmeta.settings import MetaSettings, WandbSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = json.loads(Path(cfg_path).read_text())
    seen: dict = {}
    original_init, original_shard = fomaml.init_distributed, fomaml.shard_model

    def init_distributed(shard_size: int = 0):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            ctx = original_init(shard_size)
        else:  # the trainer skips the process group for one process: set up the same (1 x 1) mesh by hand
            from torch.distributed.device_mesh import init_device_mesh

            D.exit_with_launcher()
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
            dev = "cuda" if cuda else "cpu"
            mesh = init_device_mesh(dev, (1, 1), mesh_dim_names=("task", "shard"))
            ctx = D.DistContext(rank=0, world=1, device=torch.device(dev, torch.cuda.current_device()) if cuda
                                else torch.device("cpu"), mesh=mesh)
        seen["backend"] = dist.get_backend() if dist.is_initialized() else None
        seen["world"] = ctx.world
        return ctx

    def shard_model(model, ctx, bf16: bool = False, units: str = "auto"):
        from torch.distributed.fsdp import FSDPModule

        model = original_shard(model, ctx, bf16=bf16, units=units)
        seen["fsdp2"] = isinstance(model, FSDPModule)
        seen["mixed_precision_bf16"] = bf16
        seen["fsdp_units"] = D.resolve_units(units, ctx)
        return model

    fomaml.init_distributed, fomaml.shard_model = init_distributed, shard_model
    out = Path(cfg["out"])
    fomaml.train(cfg["model"], cfg["tasks"], cfg["subjects"], MetaSettings.model_validate(cfg["meta"]), 1234, out,
                 cfg["metrics"], WandbSettings(mode="disabled"), out.parent / "ckpt", resume=False)
    Path(cfg["result"]).write_text(json.dumps({**seen, **cuda_peak_memory()}))
    return 0


RUNNERS = {"build": sec_build, "peak": sec_peak, "trl_hf": sec_trl_hf, "fomaml": sec_fomaml,
           "trl_vllm": sec_trl_vllm}


def run_section_here(name: str, ctx_path: str, result_path: str) -> int:
    _paths()
    ctx = json.loads(Path(ctx_path).read_text())
    if ctx["smoke"]:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res = RUNNERS[name](ctx)
    Path(result_path).write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: a vLLM engine or a process group can hang at exit


# ---------------------------------------------------------------- orchestration


EXTRA_SITE: list[str] = []  # --wheels' target folder, after src/ on the sections' PYTHONPATH


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *EXTRA_SITE, *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_section(name: str, ctx: dict, timeout: float, logs: Path) -> dict:
    """Run one section in a subprocess (own process group, killed at ``timeout``); its result or the failure."""
    work = Path(ctx["work"])
    ctx_path, result = work / f"{name}_ctx.json", work / f"{name}_result.json"
    ctx_path.write_text(json.dumps(ctx))
    log = logs / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, str(ctx_path), str(result)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
        end, grace = t0 + max(1.0, timeout), None
        while (rc := p.poll()) is None and time.perf_counter() < end:
            if result.exists():  # done: allow it a little time to exit
                grace = grace or time.perf_counter() + 20
                if time.perf_counter() > grace:
                    break
            time.sleep(0.5)
        _kill_group(p)  # whatever it left behind (also on success: its process group)
    wall = round(time.perf_counter() - t0, 1)
    if result.exists():
        print(f"[gpu_check] {name}: ok in {wall}s", file=sys.stderr, flush=True)
        return {**json.loads(result.read_text()), "section_s": wall, **({} if rc == 0 else {"exit": rc})}
    why = f"timed out after {timeout:.0f}s" if rc is None else f"exit {rc}"
    tail = log.read_text(errors="replace").splitlines()[-25:]
    err = next((x for x in reversed(tail) if re.search(r"(Error|Exception|error:)", x)), tail[-1] if tail else "")
    print(f"[gpu_check] {name}: FAILED ({why}, {wall}s); last lines of {log}:\n  " + "\n  ".join(tail),
          file=sys.stderr, flush=True)
    return {"failed": why, "error": err.strip()[:300], "section_s": wall}


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu_check_out")


def spec_peak(gpu: str) -> float | None:
    for key in sorted(SPEC_PEAK_TFLOPS, key=len, reverse=True):
        if key in gpu.upper():
            return SPEC_PEAK_TFLOPS[key]
    return None


def cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(res: dict) -> None:
    where = res["gpu"] or "CPU (--cpu-smoke: tiny model, float32, gloo)"
    print(f"\nGPU check: {where}, torch {res['versions'].get('torch')}, model "
          f"{res.get('model', {}).get('n_params', 0) / 1e6:.0f}M params, measured peak "
          f"{cell(res.get('peak_tflops'), '.3g')} TFLOP/s (spec {cell(res.get('spec_tflops'), '.0f')})")
    print(f"{'section':<12}{'status':<10}{'tokens/s':>11}{'step s':>9}{'peak GiB':>10}{'TFLOP/s':>9}"
          f"{'MFU meas':>10}{'MFU spec':>10}")
    for name in ORDER[1:]:
        r = res["sections"].get(name, {})
        status = ("skipped" if "skipped" in r else "FAILED" if "failed" in r else "ok") if r else "-"
        print(f"{name:<12}{status:<10}{cell(r.get('tokens_per_s'), '.0f'):>11}{cell(r.get('step_s'), '.2f'):>9}"
              f"{cell(r.get('peak_mem_gib'), '.1f'):>10}{cell(r.get('model_tflops'), '.3g'):>9}"
              f"{cell(r.get('mfu_measured_peak'), '.3f'):>10}{cell(r.get('mfu_spec_peak'), '.3f'):>10}")
        why = r.get("skipped") or (f"{r['failed']}: {r.get('error', '')}" if "failed" in r else None)
        if why:
            print(f"{'':<12}{why}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same sections on a tiny model on the CPU")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all sections together (GPU run)")
    p.add_argument("--sections", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of wheels: those whose package is not installed are pip-installed (--no-deps) "
                        "into the work folder for the sections")
    p.add_argument("--keep", action="store_true", help="keep the work folder (model, checkpoints)")
    p.add_argument("--section", nargs=3, metavar=("NAME", "CTX", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--fomaml-worker", metavar="CFG", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.section:
        return run_section_here(*a.section)
    if a.fomaml_worker:
        return fomaml_worker(a.fomaml_worker)

    t_start = time.perf_counter()
    smoke = a.cpu_smoke
    cuda, gpu = False, None
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else None
    if not cuda and not smoke:
        print("gpu_check: no CUDA device on this machine: nothing measured (--cpu-smoke runs the code paths on "
              "a tiny model on the CPU)")
        skipped = "no CUDA device" if importlib.util.find_spec("torch") else "torch is not installed"
        print(json.dumps({"cuda": False, "skipped": skipped}))
        return 0

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    installed = []
    if a.wheels:
        installed = install_wheels(a.wheels.resolve(), work / "site")
        if installed:
            EXTRA_SITE.append(str(work / "site"))
            print(f"[gpu_check] installed from {a.wheels}: {', '.join(installed)}", file=sys.stderr)
    imports = check_imports()
    if imports["missing"]:
        print(f"[gpu_check] missing packages: {', '.join(imports['missing'])}"
              + "".join(f"; {m}: {why}" for m, why in imports["broken"].items()), file=sys.stderr)
        for line in imports["pip"]:
            print(f"[gpu_check]   {line}", file=sys.stderr)
    out_dir = (a.out or default_out()).resolve()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(ORDER)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {ORDER}")
    res: dict = {"cuda": cuda, "cpu_smoke": smoke, "gpu": gpu, "spec_tflops": spec_peak(gpu) if gpu else None,
                 "versions": imports["versions"], "missing": imports["missing"], "pip": imports["pip"],
                 "broken": imports["broken"], "installed_from_wheels": installed,
                 "python": platform.python_version(), "sections": {}}
    deadline = t_start + (a.budget if not smoke else 1e9)
    ctx = {"smoke": smoke, "work": str(work), "spec_tflops": res["spec_tflops"]}
    try:
        if section_missing("build", imports):
            res["sections"]["build"] = {"skipped": "missing " + ", ".join(section_missing("build", imports))}
        else:
            res["model"] = ctx["model"] = run_section("build", ctx, _limit("build", smoke, deadline), logs)
        for name in (s for s in ORDER if s in wanted):
            miss = section_missing(name, imports)
            if name == "trl_vllm" and smoke:
                res["sections"][name] = {"skipped": "HF generation only in --cpu-smoke"}
            elif miss:
                res["sections"][name] = {"skipped": "missing " + ", ".join(miss)}
            elif name != "peak" and "n_params" not in ctx.get("model", {}):
                res["sections"][name] = {"skipped": "no model (the build section failed)"}
            elif deadline - time.perf_counter() < 20:
                res["sections"][name] = {"skipped": f"out of the {a.budget:.0f}s budget"}
            else:
                r = run_section(name, ctx, _limit(name, smoke, deadline), logs)
                res["sections"][name] = r
                if name == "peak" and "peak_tflops" in r:
                    res["peak_tflops"] = ctx["peak_tflops"] = r["peak_tflops"]
    finally:
        if a.keep:
            print(f"[gpu_check] work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"results: {out_dir / 'gpu_check.json'}, logs: {logs}")
    print(json.dumps(summary(res)))
    return 0


def _limit(name: str, smoke: bool, deadline: float) -> float:
    _, gpu_s, cpu_s = SECTIONS[name]
    return cpu_s if smoke else min(gpu_s, deadline - time.perf_counter())


def summary(res: dict) -> dict:
    """The last stdout line: the headline figures of each section (the full record is in gpu_check.json)."""
    keys = ("tokens_per_s", "step_s", "peak_mem_gib", "model_tflops", "mfu_measured_peak", "mfu_spec_peak",
            "backend", "fsdp2", "fsdp_units", "skipped", "failed", "error")
    return {"cuda": res["cuda"], "cpu_smoke": res["cpu_smoke"], "gpu": res["gpu"],
            "peak_tflops": res.get("peak_tflops"), "spec_tflops": res["spec_tflops"],
            "n_params": res.get("model", {}).get("n_params"), "missing": res["missing"],
            **{name: {k: v for k, v in r.items() if k in keys} for name, r in res["sections"].items()
               if name != "peak"},
            "wall_s": res["wall_s"]}


if __name__ == "__main__":
    raise SystemExit(main())
