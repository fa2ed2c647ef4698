"""Seconds per GRPO step: our TRL path (``train_trl``) vs a bare ``GRPOTrainer`` script.

Both train the same tiny Qwen3 (built here with ``build_tiny_model``) on the same GSM8K prompts
(xml_cot format) with the same settings: batch prompts x group size, completion length, lr and
its (constant) schedule, CPU fp32, no activation checkpointing, reward ``xml_count``. A step's
time is the wall time between consecutive ``on_step_end`` events, so it includes generation,
scoring, the update and every callback (our metrics table, stderr line, NaN check). The first
``--warmup`` steps are dropped. Runs alternate (bare, ours, bare, ours, ...) to spread machine noise over both.

Against the limit: the run also times torch's own peak (``rlmeta.testing.bench.gemm_peak_gflops``,
best of a few 2048 x 2048 float32 products at the same thread count) and prints each path's model
GFLOP/s and fraction of that peak (``peak_gflops_torch``, ``{ours,bare}_model_gflops``,
``{ours,bare}_frac_peak``). A step's model FLOPs (``rl_step_flops``; Kaplan et al. 2020, PaLM
appendix B) are the generation of ``batch_prompts x group_size`` completions of the full
``--max-new-tokens`` (random tiny models seldom stop early, so this is an upper bound) plus one
forward + backward over every prompt (once per group) + completion.

Prints a table, then as its LAST line one JSON object with ``trl_path_over_bare_trl``
(our median s/step / bare median s/step; target <= 1.0) and the raw figures.

The defaults (4 steps per run, 1 warm-up, 2 runs of each path: 6 timed steps each) take under
a minute on an idle 2-core machine (a few when its cores are shared); the figure in
docs/benchmarks.md was measured with ``--steps 6``.

    .venv/bin/python benchmarks/train_step_trl.py [--steps 4] [--repeats 2] [--batch-prompts 8] ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.settings import ROOT, ModelBuild, RLJob, WandbSettings


def make_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (the first from train begin)."""

        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepClock()


def setup(work: Path, n_prompts: int, vocab: int):
    """Tiny model + prompts parquet (train split) from the bundled GSM8K sample."""
    import pyarrow as pa

    from rlmeta.io import write_table
    from rlmeta.models.build import build_tiny_model
    from rlmeta.prompts import xml_cot
    from rlmeta.tables import PROMPTS

    gsm = ROOT / "resources" / "gsm8k" / "train.jsonl"
    model = build_tiny_model(work / "model", ModelBuild(tokenizer="bpe", vocab_size=vocab), [gsm], seed=0)
    rows = [json.loads(line) for line in gsm.read_text().splitlines()[:n_prompts]]
    table = [dict(prompt_id=f"p{i}", experiment="bench", item_id=f"i{i}", task="gsm8k", split="train",
                  prompt=xml_cot({"question": r["question"]}), reference=r["answer"].split("####")[-1].strip(),
                  reference_completion=None) for i, r in enumerate(rows)]
    write_table(work / "prompts.parquet", pa.Table.from_pylist(table, schema=PROMPTS))
    return model, work / "prompts.parquet"


def step_flops(model: Path, prompts: Path, batch_prompts: int, group_size: int, new_tokens: int) -> float:
    """Model FLOPs of one step (``rl_step_flops``) at the mean chat-templated prompt length of the table."""
    from transformers import AutoTokenizer

    from rlmeta.io import read_table
    from rlmeta.testing.bench import rl_step_flops

    tok = AutoTokenizer.from_pretrained(model)
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
             for r in read_table(prompts).to_pylist()]
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return rl_step_flops(model, [sum(lens) / len(lens)] * batch_prompts, group_size, new_tokens)


def run_ours(model, prompts, job: RLJob, out: Path, seed: int) -> list[float]:
    from rlmeta.rl.trl_trainer import train_trl

    clock = make_clock()
    train_trl(model, prompts, job, out / "checkpoints", out / "train_metrics.parquet",
              WandbSettings(mode="disabled"), seed, callbacks=[clock])
    return clock.times


def run_bare(model, prompts, job: RLJob, out: Path, seed: int) -> list[float]:
    """What a TRL user writes by hand: GRPOConfig + GRPOTrainer + a reward function."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlmeta.io import read_table
    from rlmeta.rewards.xml import xml_count
    from rlmeta.schedules import transformers_name

    t = job.train
    rows = read_table(prompts).to_pylist()
    ds = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "reference": [r["reference"] for r in rows]})

    def reward(completions, **kw):
        return [xml_count(c[0]["content"]) for c in completions]

    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, activation_checkpointing=False, seed=seed, data_seed=seed,
        max_steps=t.steps, per_device_train_batch_size=t.batch_prompts * t.group_size,
        num_generations=t.group_size, max_completion_length=t.max_new_tokens,
        learning_rate=t.learning_rate, temperature=t.temperature, epsilon_high=job.epsilons[1],
        lr_scheduler_type=transformers_name(t.lr_schedule)[0],  # ours is constant; TRL's default decays
        logging_steps=1, report_to="none", save_strategy="no",
    )
    clock = make_clock()
    GRPOTrainer(model=str(model), reward_funcs=reward, args=args, train_dataset=ds, callbacks=[clock]).train()
    return clock.times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs of each path (alternating)")
    p.add_argument("--batch-prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the tiny model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    job = RLJob.model_validate({"algorithm": "grpo", "backend": "torch", "rewards": {"xml_count": 1.0}, "train": {
        "steps": a.steps, "batch_prompts": a.batch_prompts, "group_size": a.group_size,
        "max_new_tokens": a.max_new_tokens, "learning_rate": 1e-3, "temperature": 1.0,
        "checkpoint_every": 10_000, "trl": {"report_to": "none"}}})
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        work = Path(tmp)
        model, prompts = setup(work, 4 * a.batch_prompts, a.vocab)
        times: dict[str, list[float]] = {"bare": [], "ours": []}
        for r in range(a.repeats):
            for name, fn in (("bare", run_bare), ("ours", run_ours)):
                steps = fn(model, prompts, job, work / f"{name}{r}", a.seed)
                times[name] += steps[a.warmup:]
                print(f"run {r} {name}: " + " ".join(f"{s:.3f}" for s in steps), file=sys.stderr, flush=True)

        flops = step_flops(model, prompts, a.batch_prompts, a.group_size, a.max_new_tokens)
    from rlmeta.testing.bench import gemm_peak_gflops, gflops

    peak = gemm_peak_gflops("torch")
    med = {k: statistics.median(v) for k, v in times.items()}
    mg = {k: gflops(flops, med[k]) for k in med}
    print(f"\nGRPO step on CPU: tiny Qwen3 (vocab {a.vocab}), {a.batch_prompts} prompts x {a.group_size} "
          f"completions, {a.max_new_tokens} new tokens, {a.steps - a.warmup} timed steps x {a.repeats} runs")
    print(f"{'path':<12}{'median s/step':>15}{'mean':>10}{'min':>10}{'max':>10}{'model GFLOP/s':>15}"
          f"{'peak GFLOP/s':>14}{'of peak':>9}")
    for k in ("bare", "ours"):
        v = times[k]
        print(f"{k:<12}{med[k]:>15.3f}{statistics.mean(v):>10.3f}{min(v):>10.3f}{max(v):>10.3f}{mg[k]:>15.3f}"
              f"{peak:>14.1f}{mg[k] / peak:>9.2%}")
    ratio = med["ours"] / med["bare"]
    print(f"ours / bare = {ratio:.3f}")
    print(json.dumps({"trl_path_over_bare_trl": round(ratio, 4), "ours_s_per_step": round(med["ours"], 4),
                      "bare_s_per_step": round(med["bare"], 4), "ours_steps": [round(x, 4) for x in times["ours"]],
                      "bare_steps": [round(x, 4) for x in times["bare"]], "batch_prompts": a.batch_prompts,
                      "group_size": a.group_size, "max_new_tokens": a.max_new_tokens, "vocab": a.vocab,
                      "torch_threads": torch.get_num_threads(), "device": "cpu",
                      "peak_gflops_torch": round(peak, 2), "step_model_gflop": round(flops / 1e9, 4),
                      **{f"{k}_model_gflops": round(mg[k], 4) for k in mg},
                      **{f"{k}_frac_peak": round(mg[k] / peak, 5) for k in mg}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
