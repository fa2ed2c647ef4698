"""Seconds per GRPO training step: our MLX trainer vs mlx-lm-lora's ``train_grpo``, and with ``--trl``
the TRL path vs a bare ``GRPOTrainer`` (delegated to ``benchmarks/train_step_trl.py`` with these sizes).

Both MLX trainers get the same model, prompts, reward, batch (prompts x group size), completion
length, sampler (temperature 1, no top-p/top-k), loss (``grpo`` aggregation, eps 0.2/0.28,
beta 0, one update per rollout), full fine-tuning and AdamW with bias correction. A step is one
rollout (generation + rewards) plus one update. mlx-lm-lora is not a project dependency: it is
imported from the environment, else from ``.bench-deps/``, where ``make bench`` (or ``make
bench-deps``) installs the version pinned in the Makefile. Prints a table, then one JSON line with
the ratios (ours / theirs).

Against the limit: the run also times the machine's peak (``rlmeta.testing.bench.gemm_peak_gflops``,
best of a few 2048 x 2048 float32 products) in MLX (``peak_gflops_mlx``) and, since our CPU fast
path hands its large products to NumPy's BLAS, in NumPy (``peak_gflops_numpy``), and prints each
trainer's model GFLOP/s and its fraction of the MLX peak (``{mlx,mlx_lm_lora}_model_gflops``,
``{mlx,mlx_lm_lora}_frac_peak``) and of the NumPy one (``..._frac_peak_numpy``: above 1 of the MLX
peak means the products did not run through MLX's own CPU matmul). A step's model FLOPs
(``rl_step_flops``; Kaplan et al. 2020, PaLM appendix B): generating ``batch_prompts x group_size``
completions of the measured mean length, then one forward + backward over every prompt (once per
group) + completion.

The defaults (3 timed steps after 1 warm-up, 4 prompts x 4 completions, 64 new tokens) take about
2 minutes on a 2-core machine; the figure in docs/benchmarks.md was measured with ``--steps 5
--warmup 2``. ``make bench`` runs ``train_step_trl.py`` on its own, so ``--trl`` is off by default
(``trl_path_over_bare_trl`` is then null here).

    .venv/bin/python benchmarks/train_step.py [--model DIR] [--steps 3] [--batch-prompts 4] [--trl] ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.settings import ROOT, ModelBuild, RLJob
from rlmeta.testing.rewards import registered

BENCH_DEPS = ROOT / ".bench-deps"
BUILD = ModelBuild(tokenizer="bpe", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                   intermediate_size=384)


def import_mlx_lm_lora():
    """mlx-lm-lora's GRPO trainer module: from the environment, else from ``.bench-deps/``."""
    try:
        import mlx_lm_lora  # noqa: F401
    except ImportError:
        if not BENCH_DEPS.is_dir():
            raise SystemExit("mlx-lm-lora missing: run `make bench-deps` (installs the pinned peers into "
                             ".bench-deps/)") from None
        sys.path.append(str(BENCH_DEPS))  # after the venv: only the peer itself comes from there
    from mlx_lm_lora.trainer import grpo_trainer

    return grpo_trainer


def questions(n: int) -> list[str]:
    """``n`` prompts of one token length: a GSM8K question behind a two-digit id (one token per digit).

    Equal lengths keep the comparison about the trainers: mlx-lm-lora batches prompts of similar
    length together, our trainer samples uniformly, and mixed lengths would add padding to ours only.
    """
    q = json.loads((ROOT / "resources/gsm8k/train.jsonl").read_text().splitlines()[0])["question"]
    return [f"Problem {i % 100:02d}. {q}" for i in range(n)]


def messages(q: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in <reasoning> and <answer> tags."}, {"role": "user", "content": q}]


def reward(completion, reference=None, prompt=None) -> float:
    """The benchmark's reward (``bench_reward``): the built-in coherence score, with its defaults."""
    from rlmeta.rewards.text import coherence

    return coherence(completion)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


class Ours:
    """rlmeta's ``MLXTrainer``, one ``train_step`` per call (``bench_reward`` must be registered)."""

    def __init__(self, model: Path, a, tmp: Path):
        from rlmeta.io import write_records
        from rlmeta.rl.mlx_trainer import MLXTrainer
        from rlmeta.tables import PROMPTS

        tmp.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt_id": f"p{i}", "experiment": "bench", "item_id": f"i{i}", "task": f"t{i}", "split": "train",
                 "prompt": messages(q), "reference": None, "reference_completion": None}
                for i, q in enumerate(questions(a.prompts))]
        write_records(tmp / "prompts.parquet", rows, PROMPTS)
        job = RLJob.model_validate({"algorithm": "grpo", "backend": "mlx", "rewards": {"bench_reward": 1.0}, "train": {
            "steps": a.warmup + a.steps, "batch_prompts": a.batch_prompts, "group_size": a.group_size,
            "learning_rate": 1e-5, "max_new_tokens": a.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
            "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.28, "loss_type": "grpo", "updates_per_batch": 1}})
        self.trainer = MLXTrainer(model, tmp / "prompts.parquet", job, seed=0)

    def step(self) -> tuple[float, float, float]:
        """(wall s, CPU s, mean completion length) of one step."""
        t0, c0 = time.perf_counter(), time.process_time()
        row = self.trainer.train_step()
        return time.perf_counter() - t0, time.process_time() - c0, row["completion_len_mean"]


class Theirs:
    """mlx-lm-lora's ``train_grpo``, called with ``iters=1`` per step (same model and optimizer kept)."""

    def __init__(self, model: Path, a, tmp: Path):
        import mlx.optimizers as optim
        import mlx_lm
        from mlx_lm.tuner.callbacks import TrainingCallback

        self.g = import_mlx_lm_lora()
        tmp.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = mlx_lm.load(str(model))
        self.data = []
        for q in questions(a.prompts):
            ids = self.tok.apply_chat_template(messages(q), add_generation_prompt=True, tokenize=True)
            self.data.append((list(ids["input_ids"] if isinstance(ids, dict) else ids), [], q, ""))

        outer = self

        class Timer(TrainingCallback):
            def on_train_loss_report(self, info):
                outer.report = (time.process_time(), info)

        self.timer = Timer()
        self.optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0, bias_correction=True)
        self.args = self.g.GRPOTrainingArgs(
            batch_size=a.batch_prompts, iters=1, group_size=a.group_size, beta=0.0, epsilon=0.2,
            epsilon_high=0.28, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            min_p=0.0, grpo_loss_type="grpo", steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
            max_seq_length=4096, adapter_file=str(tmp / "adapters.safetensors"))

    def step(self) -> tuple[float, float, float]:
        import contextlib
        import io

        def bench_reward(prompts, completions, answer, types=None):
            return [reward(c) for c in completions]

        c0 = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.g.train_grpo(self.model, None, self.tok, self.optimizer, self.data, None, reward_funcs=[bench_reward],
                              args=self.args, training_callback=self.timer, end_answer_token="")
        cpu, info = self.report
        return 1.0 / info["iterations_per_second"], cpu - c0, info["train_average_generated_tokens"]


def bench_mlx(model: Path, a, tmp: Path) -> dict:
    """Interleave the two trainers step by step (a shared machine slows both alike); medians."""
    runs = {"ours": Ours(model, a, tmp / "ours"), "theirs": Theirs(model, a, tmp / "theirs")}
    got = {k: [] for k in runs}
    for i in range(a.warmup + a.steps):
        for k, r in runs.items():
            wall, cpu, length = r.step()
            print(f"  step {i} {k:<7} {wall:7.3f}s wall {cpu:7.3f}s cpu  len {length:.1f}", file=sys.stderr, flush=True)
            if i >= a.warmup:
                got[k].append((wall, cpu, length))
    res = {k: {"s_per_step": median([w for w, _, _ in v]), "cpu_s_per_step": median([c for _, c, _ in v]),
               "completion_len": sum(n for _, _, n in v) / len(v)} for k, v in got.items()}
    from rlmeta.testing.bench import gflops, rl_step_flops

    plen = len(runs["theirs"].data[0][0])  # every prompt has this length (``questions``)
    for r in res.values():
        r["model_gflops"] = gflops(rl_step_flops(model, [plen] * a.batch_prompts, a.group_size, r["completion_len"]),
                                   r["s_per_step"])
    return res


def bench_trl(a) -> dict | None:
    """Last JSON line of ``benchmarks/train_step_trl.py`` (None without ``--trl``, or when it is absent or fails)."""
    script = ROOT / "benchmarks" / "train_step_trl.py"
    if not script.exists() or not a.trl:
        return None
    cmd = [sys.executable, str(script), "--batch-prompts", str(a.batch_prompts), "--group-size", str(a.group_size),
           "--max-new-tokens", str(a.max_new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode or not lines:
        print(f"train_step_trl.py failed (rc={proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint folder (default: build a tiny Qwen3 once into /tmp)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16, help="train prompts (GSM8K questions)")
    p.add_argument("--batch-prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--trl", action="store_true", help="also run train_step_trl.py with the same sizes")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = a.model
        if model is None:
            from rlmeta.models.build import build_tiny_model

            key = hashlib.sha256(BUILD.model_dump_json().encode()).hexdigest()[:12]
            model = Path(tempfile.gettempdir()) / f"rlmeta-bench-model-{key}"
            if not (model / "config.json").exists():
                build_tiny_model(model, BUILD, [ROOT / "resources/gsm8k/train.jsonl"], 0)
        with registered("bench_reward", reward, "coherence (benchmark)"):
            res = bench_mlx(model, a, tmp)
        ours, theirs = res["ours"], res["theirs"]
    trl = bench_trl(a)
    from rlmeta.testing.bench import gemm_peak_gflops

    peak, peak_np = gemm_peak_gflops("mlx"), gemm_peak_gflops("numpy")
    print(f"\n{'trainer':<28}{'s/step':>10}{'cpu s/step':>12}{'completion len':>16}{'model GFLOP/s':>15}"
          f"{'MLX peak':>10}{'of peak':>9}{'of NumPy peak':>15}")
    for name, r in (("rlmeta MLX", ours), ("mlx-lm-lora train_grpo", theirs)):
        print(f"{name:<28}{r['s_per_step']:>10.3f}{r['cpu_s_per_step']:>12.3f}{r['completion_len']:>16.1f}"
              f"{r['model_gflops']:>15.3f}{peak:>10.1f}{r['model_gflops'] / peak:>9.2%}"
              f"{r['model_gflops'] / peak_np:>15.2%}")
    print(f"(NumPy BLAS peak, which our CPU fast path uses: {peak_np:.1f} GFLOP/s)")
    if trl:
        print(f"{'TRL path (train_trl)':<28}{trl['ours_s_per_step']:>10.3f}")
        print(f"{'bare TRL GRPOTrainer':<28}{trl['bare_s_per_step']:>10.3f}")
    result = {
        "mlx_over_mlx_lm_lora": ours["s_per_step"] / theirs["s_per_step"],
        "trl_path_over_bare_trl": (trl or {}).get("trl_path_over_bare_trl"),
        "mlx_cpu_over_mlx_lm_lora": ours["cpu_s_per_step"] / theirs["cpu_s_per_step"],
        "mlx_s_per_step": ours["s_per_step"], "mlx_lm_lora_s_per_step": theirs["s_per_step"],
        "mlx_cpu_s_per_step": ours["cpu_s_per_step"], "mlx_lm_lora_cpu_s_per_step": theirs["cpu_s_per_step"],
        "mlx_completion_len": ours["completion_len"], "mlx_lm_lora_completion_len": theirs["completion_len"],
        "peak_gflops_mlx": round(peak, 2), "peak_gflops_numpy": round(peak_np, 2),
        "mlx_model_gflops": round(ours["model_gflops"], 4), "mlx_frac_peak": round(ours["model_gflops"] / peak, 5),
        "mlx_lm_lora_model_gflops": round(theirs["model_gflops"], 4),
        "mlx_lm_lora_frac_peak": round(theirs["model_gflops"] / peak, 5),
        "mlx_frac_peak_numpy": round(ours["model_gflops"] / peak_np, 5),
        "mlx_lm_lora_frac_peak_numpy": round(theirs["model_gflops"] / peak_np, 5),
        "trl": trl, "settings": {k: v for k, v in vars(a).items() if k != "model"} | {"model": str(model)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
