"""Where the seconds of one MLX GRPO/GSPO training step go.

Runs ``MLXTrainer.train_step`` itself with each phase wrapped in a timer and an ``mx.eval``
barrier on its outputs: generation (``policy.generate``), reward scoring (``rlmeta.scoring.score``),
the rest of the rollout (packing the batch, the reference model's log-probs when beta > 0),
each update's forward + backward (``MLXTrainer.gradients``) and optimizer step
(``MLXTrainer.apply``), then one checkpoint (``MLXTrainer.save``). The old log-probs of the
importance ratio are the sampler's own (recorded during generation), so there is no separate
pass for them. Prints a table per step, then as its last line one JSON object: the phase
seconds of the last step (``phases``), of every step (``steps``), and the settings.

Against the limit: the run also times the machine's peak (``rlmeta.testing.bench.gemm_peak_gflops``,
best of a few 2048 x 2048 float32 products) in MLX (``peak_gflops_mlx``) and NumPy
(``peak_gflops_numpy``: the BLAS the CPU fast path's products run through), and gives the last
step's model GFLOP/s and fraction of the MLX peak for generation, each update's forward + backward
and the whole step (``model_gflops``, ``frac_peak``, ``frac_peak_numpy``). Model FLOPs (Kaplan et al. 2020, PaLM
appendix B; ``rlmeta.testing.bench``) are counted at the mean prompt length of the prompts table
and the step's mean completion length: generation = one prefill per prompt plus ``group_size``
completions, an update = forward + backward over every prompt (once per group) + completion.

    .venv/bin/python benchmarks/mlx_step_profile.py [--model DIR] [--prompts PARQUET] [--steps 2]
        [--experiment-json JSON] [--max-new-tokens N] [--padded]

``--experiment-json`` is an ``RLJob`` (algorithm, rewards, reward_params, train) as JSON.
``--padded`` turns off ``sequence_logprobs``' packed NumPy path (``mlx_packed.HOST_GEMM``): the
padded batch through mlx-lm, as before. Without ``--model``/``--prompts`` it uses the headlines
warm start and prompts under ``results/`` when present, else a tiny Qwen3 of the same shape
(hidden 64, 2 layers, vocabulary 2048) and synthetic ~300-450-token prompts built into /tmp.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rlmeta.settings import ROOT, ModelBuild, RLJob

MODEL = ROOT / "results/warmstart/headlines_grpo_ued"
PROMPTS = ROOT / "results/headlines_gspo/prompts.parquet"
EXPERIMENT = {"algorithm": "gspo", "rewards": {"sections": 0.5, "length": 0.25, "coherence": 0.25},
              "reward_params": {"length": {"min_words": 30, "max_words": 120}},
              "train": {"steps": 2, "batch_prompts": 8, "group_size": 4, "learning_rate": 5e-4, "temperature": 0.9,
                        "max_new_tokens": 160, "updates_per_batch": 2, "loss_type": "grpo", "checkpoint_every": 8}}
BUILD = ModelBuild(tokenizer="bpe", vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=256)


def fallback_inputs(tmp: Path) -> tuple[Path, Path]:
    """A tiny Qwen3 of the headlines shape and synthetic long prompts (cached under /tmp)."""
    from rlmeta.io import write_records
    from rlmeta.models.build import build_tiny_model
    from rlmeta.tables import PROMPTS as SCHEMA

    key = hashlib.sha256(BUILD.model_dump_json().encode()).hexdigest()[:12]
    model = Path(tempfile.gettempdir()) / f"rlmeta-profile-model-{key}"
    if not (model / "config.json").exists():
        build_tiny_model(model, BUILD, [ROOT / "resources/gsm8k/train.jsonl"], 0)
    lines = [json.loads(x)["question"] for x in (ROOT / "resources/gsm8k/train.jsonl").read_text().splitlines()[:64]]
    rows = []
    for i in range(32):
        text = " ".join(lines[(i + k) % len(lines)] for k in range(4 + i % 3))
        rows.append({"prompt_id": f"p{i}", "experiment": "profile", "item_id": f"i{i}", "task": f"t{i}",
                     "split": "train", "reference": None, "reference_completion": None,
                     "prompt": [{"role": "system", "content": "Write a news story with a headline and sections."},
                                {"role": "user", "content": text}]})
    write_records(tmp / "prompts.parquet", rows, SCHEMA)
    return model, tmp / "prompts.parquet"


class Phases:
    """Accumulates wall seconds per phase name; ``wrap`` times a callable with an eval barrier."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + seconds

    def wrap(self, name, fn, evaluate=True):
        import mlx.core as mx

        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            if evaluate:
                mx.eval([a for a in _arrays(out)])
            self.add(name() if callable(name) else name, time.perf_counter() - t0)
            return out

        return timed


def _arrays(x):
    import mlx.core as mx

    if isinstance(x, mx.array):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _arrays(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _arrays(v)


def profile(a, tmp: Path) -> dict:
    import mlx.core as mx

    from rlmeta.policy import mlx_packed
    from rlmeta.rl import mlx_trainer
    from rlmeta.rl.mlx_trainer import MLXTrainer
    from rlmeta.tracking import MetricsTable

    mlx_packed.HOST_GEMM = not a.padded
    experiment = json.loads(a.experiment_json) if a.experiment_json else json.loads(json.dumps(EXPERIMENT))
    train = experiment.setdefault("train", {})
    train["steps"] = max(int(train.get("steps", 1)), a.steps)
    if a.max_new_tokens:
        train["max_new_tokens"] = a.max_new_tokens
    model, prompts = a.model, a.prompts
    if model is None and prompts is None and not (MODEL.is_dir() and PROMPTS.exists()):
        model, prompts = fallback_inputs(tmp)
        experiment["rewards"], experiment["reward_params"] = {"coherence": 1.0}, {}
    model, prompts = model or MODEL, prompts or PROMPTS
    job = RLJob.model_validate({"backend": "mlx", **experiment})
    t0 = time.perf_counter()
    trainer = MLXTrainer(model, prompts, job, seed=a.seed)
    metrics = MetricsTable([f"reward/{n}" for n in job.rewards])
    load_s = time.perf_counter() - t0

    ph = Phases()
    state = {"update": 0}
    trainer.policy.generate = ph.wrap("generation", trainer.policy.generate)
    mlx_trainer.score = ph.wrap("rewards", mlx_trainer.score, evaluate=False)  # NumPy scores: no barrier
    trainer.reference_logprobs = ph.wrap("ref_logprobs", trainer.reference_logprobs)
    rollout = trainer.rollout
    trainer.rollout = ph.wrap("rollout", rollout)

    def gradients(batch, old_logp, _f=trainer.gradients):
        state["update"] += 1
        return ph.wrap(f"update{state['update']}_fwd_bwd", _f)(batch, old_logp)

    trainer.gradients = gradients
    trainer.apply = ph.wrap(lambda: f"update{state['update']}_optimizer", trainer.apply)

    steps = []
    for i in range(a.steps):
        ph.t.clear()
        state["update"] = 0
        mx.eval(trainer.policy.model.parameters())
        t0 = time.perf_counter()
        row = trainer.train_step()
        total = time.perf_counter() - t0
        metrics.add({k: v for k, v in row.items() if k not in ("updates", "indices", "weights_finite")})
        t1 = time.perf_counter()
        trainer.save(tmp / "checkpoints" / str(trainer.step), metrics)
        ph.add("checkpoint", time.perf_counter() - t1)
        t = dict(ph.t)
        t["pack_batch"] = t.pop("rollout") - t["generation"] - t["rewards"] - t.get("ref_logprobs", 0.0)
        t["old_logprobs"] = 0.0  # recorded by the sampler: no pass
        accounted = sum(v for k, v in t.items() if k != "checkpoint")
        t["other"] = total - accounted
        t["step_total"] = total
        steps.append({"step": i + 1, "completion_len_mean": row["completion_len_mean"], "loss": row["loss"],
                      "grad_norm": row["grad_norm"], "seconds": t})
        print(table(steps[-1]), file=sys.stderr, flush=True)
    from rlmeta.testing.bench import gemm_peak_gflops, gflops, rl_generation_flops, rl_train_flops

    peak, peak_np = gemm_peak_gflops("mlx"), gemm_peak_gflops("numpy")
    cfg, k, g = trainer.policy.config, job.train.batch_prompts, job.train.group_size
    plen = sum(map(len, trainer.prompt_ids)) / len(trainer.prompt_ids)
    new, t = steps[-1]["completion_len_mean"], steps[-1]["seconds"]
    fl = {"generation": rl_generation_flops(cfg, [plen] * k, g, new),
          "update_fwd_bwd": rl_train_flops(cfg, [plen] * k, g, new)}
    updates = sorted(n for n in t if n.startswith("update") and n.endswith("_fwd_bwd"))
    fl["step_total"] = fl["generation"] + len(updates) * fl["update_fwd_bwd"]
    secs = {"generation": t["generation"], "update_fwd_bwd": sum(t[n] for n in updates) / max(1, len(updates)),
            "step_total": t["step_total"]}
    mg = {n: gflops(fl[n], secs[n]) for n in fl}
    print(f"  {'last step, model FLOPs':<24}{'GFLOP/s':>10}{'of MLX peak':>13}{'of NumPy peak':>15}   (peak: MLX "
          f"{peak:.1f}, NumPy {peak_np:.1f} GFLOP/s)", file=sys.stderr, flush=True)
    for n, v in mg.items():
        print(f"  {n:<24}{v:>10.3f}{v / peak:>13.2%}{v / peak_np:>15.2%}", file=sys.stderr, flush=True)
    return {"phases": steps[-1]["seconds"], "steps": steps, "peak_gflops_mlx": round(peak, 2),
            "peak_gflops_numpy": round(peak_np, 2), "prompt_len_mean": round(plen, 1),
            "model_gflops": {n: round(v, 4) for n, v in mg.items()},
            "frac_peak": {n: round(v / peak, 5) for n, v in mg.items()},
            "frac_peak_numpy": {n: round(v / peak_np, 5) for n, v in mg.items()},
            "packed": not a.padded, "model": str(model),
            "load_seconds": load_s, "train": job.train.model_dump(mode="json")}


def table(step: dict) -> str:
    t = step["seconds"]
    order = ["generation", "rewards", "old_logprobs", "ref_logprobs", "pack_batch"]
    order += sorted(k for k in t if k.startswith("update"))
    order += ["other", "step_total", "checkpoint"]
    lines = [f"step {step['step']} (completion len {step['completion_len_mean']:.1f}, loss {step['loss']:.4g})",
             f"  {'phase':<24}{'seconds':>10}{'share':>8}"]
    for k in (k for k in order if k in t):
        share = "" if k in ("step_total", "checkpoint") else f"{t[k] / t['step_total']:.1%}"
        lines.append(f"  {k:<24}{t[k]:>10.3f}{share:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help=f"checkpoint folder (default {MODEL.relative_to(ROOT)})")
    p.add_argument("--prompts", type=Path, help=f"prompts parquet (default {PROMPTS.relative_to(ROOT)})")
    p.add_argument("--experiment-json", help="experiment spec as JSON (default: the headlines GSPO run)")
    p.add_argument("--steps", type=int, default=2, help="steps to profile (the JSON's phases: the last)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--padded", action="store_true", help="the padded mlx-lm path of sequence_logprobs (before)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="override train.max_new_tokens (default: the experiment's, 160 for headlines)")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mlx-step-profile-"))
    try:
        res = profile(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
