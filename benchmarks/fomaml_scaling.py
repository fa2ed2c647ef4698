"""Meta-training throughput of FOMAML with 1 and 2 torchrun processes on this machine.

Builds the embedded default (tiny Qwen3, bundled MATH sample split into subject tasks) in a
temporary folder unless --model/--tasks-dir are given, runs a few outer steps per layout
(one thread per process) and reads tokens and step_seconds from train_metrics.parquet
(the first step, with its warm-up, is left out). Layouts: 1 process; 2 task-parallel; 2 FSDP-sharded
(``meta.shard_size`` 2; ``fsdp_units`` auto, i.e. the whole model as one unit on the CPU); 2 FSDP-sharded
per decoder layer (``fsdp_units: layers``, the CUDA layout). Prints a table, then as the LAST line one
JSON object with tokens_per_s_1, tokens_per_s_2 (task-parallel) and scaling = tps2 / tps1, and the
same for the FSDP layouts (``scaling_fsdp``, ``scaling_fsdp_layers``).

Against the limit: the run also times torch's peak (``rlmeta.testing.bench.gemm_peak_gflops``, best
of a few 2048 x 2048 float32 products) at 1 thread and at 2 threads (the 2-process layouts' budget):
``peak_gflops_torch_1`` / ``peak_gflops_torch_2``, and per layout its model GFLOP/s and fraction of
the peak at its process count (``model_gflops_{1,2,2_fsdp}``, ``frac_peak_{1,2,2_fsdp}``). Model
FLOPs (Kaplan et al. 2020, PaLM appendix B): ``6N + 6 L ctx d_attn`` per trained token
(``train_tokens``) and a third of that per forward-only one (the pre-adaptation query loss), with
``ctx`` half the mean sequence length (tokens / sequences per step).

Each layout is one ``rlmeta launch --nproc 0 --cpu-procs N -- train-fomaml ...`` (torchrun, gloo).

    .venv/bin/python benchmarks/fomaml_scaling.py [--steps 5] [--model DIR --tasks-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.settings import MATH_SUBJECTS, ROOT, MetaSettings, ModelBuild

SUBJECTS = list(MATH_SUBJECTS)
TINY = ModelBuild(tokenizer="bpe")  # the embedded default's "tiny" model (config/config.yaml)


def embedded_default(work: Path) -> tuple[Path, Path]:
    """The default tiny model and MATH tasks, built from resources/ into ``work``."""
    from rlmeta.data.math_problems import prepare_math, split_math_tasks
    from rlmeta.models.build import build_tiny_model

    res = ROOT / "resources"
    prepare_math(str(res / "math"), work / "math")
    split_math_tasks(work / "math/train.parquet", SUBJECTS, 0.30, 0.40, 1234, work / "math_tasks")
    corpus = [f for sub in ("rss", "gsm8k", "math") for f in sorted((res / sub).glob("*")) if f.is_file()]
    return build_tiny_model(work / "tiny", TINY, corpus, 1234), work / "math_tasks"


def run(model: Path, tasks: Path, meta: MetaSettings, nproc: int, shard: int, out: Path, units: str = "auto") -> dict:
    """One torchrun launch; returns wall time and the steady-state tokens/s and s/step."""
    import pyarrow.parquet as pq

    meta = MetaSettings.model_validate({**meta.model_dump(), "nproc": nproc, "shard_size": shard,
                                        "fsdp_units": units})
    train_subjects = [s for s in SUBJECTS if s not in meta.test_subjects]  # held-out ones are refused
    cmd = [sys.executable, "-m", "rlmeta", "launch", "--nproc", "0", "--cpu-procs", str(nproc), "--",
           "train-fomaml", "--model", str(model), "--tasks-dir", str(tasks), "--subjects", *train_subjects,
           "--meta", meta.model_dump_json(), "--seed", "1234", "--out", str(out / "final"),
           "--metrics", str(out / "m.parquet"), "--wandb", '{"mode": "disabled"}', "--no-resume"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"torchrun failed ({p.returncode}):\n{p.stderr[-4000:]}")
    rows = pq.read_table(out / "m.parquet").to_pylist()[1:]
    tokens, secs = sum(r["tokens"] for r in rows), sum(r["step_seconds"] for r in rows)
    trained = sum(r["train_tokens"] for r in rows)
    seqs = len(rows) * meta.meta_batch_size * (meta.inner_steps * meta.support_batch + 2 * meta.query_batch)
    ctx = tokens / seqs / 2
    from rlmeta.testing.bench import flops_per_token, gflops

    fl = trained * flops_per_token(model, ctx, train=True) + (tokens - trained) * flops_per_token(model, ctx)
    return {"tokens_per_s": tokens / secs, "s_per_step": secs / len(rows), "wall_s": time.perf_counter() - t0,
            "model_gflops": gflops(fl, secs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model folder (default: build the embedded default)")
    p.add_argument("--tasks-dir", type=Path, help="MATH tasks folder (default: split the bundled sample)")
    p.add_argument("--steps", type=int, default=5, help="outer steps per run (the first is not timed)")
    p.add_argument("--meta-json", default="{}", help="meta settings over the defaults below")
    a = p.parse_args(argv)
    meta = MetaSettings.model_validate({
        "outer_steps": a.steps, "meta_batch_size": 4, "inner_steps": 2, "support_batch": 8, "query_batch": 8,
        "max_seq_len": 384, "checkpoint_every": 10_000, **json.loads(a.meta_json)})
    with tempfile.TemporaryDirectory(prefix="fomaml_bench_") as tmp:
        work = Path(tmp)
        model, tasks = (a.model, a.tasks_dir) if a.model and a.tasks_dir else embedded_default(work)
        # (name, processes, shard_size, fsdp_units); auto on the CPU: the whole model as one FSDP unit
        layouts = [("1 process", 1, 1, "auto"), ("2 processes, task-parallel", 2, 1, "auto"),
                   ("2 processes, FSDP-sharded", 2, 2, "auto"), ("2 processes, FSDP per layer", 2, 2, "layers")]
        res = {name: run(model, tasks, meta, n, s, work / f"run{i}", u) for i, (name, n, s, u) in enumerate(layouts)}
    print(f"FOMAML meta-training, {os.cpu_count()} CPUs, 1 thread per process, meta-batch {meta.meta_batch_size}, "
          f"k={meta.inner_steps}, batches {meta.support_batch}/{meta.query_batch}, {a.steps - 1} timed steps")
    import torch

    from rlmeta.testing.bench import gemm_peak_gflops

    peaks = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        peaks[n] = gemm_peak_gflops("torch")
    print(f"{'layout':<30} {'tokens/s':>10} {'s/step':>8} {'wall s':>8} {'model GFLOP/s':>14} {'peak GFLOP/s':>13} "
          f"{'of peak':>8}")
    for (name, r), (_, n, _, _) in zip(res.items(), layouts):
        print(f"{name:<30} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} {r['wall_s']:>8.1f} "
              f"{r['model_gflops']:>14.3f} {peaks[n]:>13.1f} {r['model_gflops'] / peaks[n]:>8.2%}")
    t1, t2, t2f, t2l = (res[n]["tokens_per_s"] for n, *_ in layouts)
    keys = dict(zip(["1", "2", "2_fsdp", "2_fsdp_layers"], layouts))
    against = {"peak_gflops_torch_1": round(peaks[1], 2), "peak_gflops_torch_2": round(peaks[2], 2)}
    for k, (name, n, *_) in keys.items():
        against[f"model_gflops_{k}"] = round(res[name]["model_gflops"], 4)
        against[f"frac_peak_{k}"] = round(res[name]["model_gflops"] / peaks[n], 5)
    print(json.dumps({"tokens_per_s_1": round(t1, 1), "tokens_per_s_2": round(t2, 1), "scaling": round(t2 / t1, 3),
                      "tokens_per_s_2_fsdp": round(t2f, 1), "scaling_fsdp": round(t2f / t1, 3),
                      "tokens_per_s_2_fsdp_layers": round(t2l, 1), "scaling_fsdp_layers": round(t2l / t1, 3),
                      "s_per_step_1": round(res[layouts[0][0]]["s_per_step"], 3), **against}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
