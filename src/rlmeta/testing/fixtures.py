"""Synthetic experiment folders with the real table schemas, for the evaluation and report tests:
RL experiments (prompts, responses and rewards scored with the real rewards, train_metrics, a fake
checkpoint) and FOMAML experiments (meta-training metrics, the adaptation summary)."""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from rlmeta.io import write_json, write_records, write_table
from rlmeta.prompts import SECTIONS, TEMPLATES, get_template
from rlmeta.scoring import score_responses
from rlmeta.settings import Experiment
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema, train_metrics_schema

SUBJECTS = ["algebra", "geometry", "number_theory"]
NASTY = "<script>alert('x')</script> & <b>bold</b>"


def prompt_rows(exp: str, template: str, questions: list[tuple[str, str | None]], tasks=None) -> list[dict]:
    tpl = get_template(template)
    rows = []
    for i, (q, ref) in enumerate(questions):
        row = {"question": q, "title": q, "summary": "A summary."}
        rows.append({"prompt_id": f"p{i:03d}", "experiment": exp, "item_id": f"i{i}", "split": "eval",
                     "task": (tasks or ["gsm8k"] * len(questions))[i], "prompt": tpl(row), "reference": ref,
                     "reference_completion": None})
    return rows


def response_rows(policy: str, completions: dict[tuple[str, int], str]) -> list[dict]:
    return [{"prompt_id": pid, "sample_idx": s, "policy": policy, "completion": c, "n_tokens": len(c.split()),
             "finish_reason": "stop" if len(c) < 200 else "length", "temperature": 0.8, "seed": 7}
            for (pid, s), c in sorted(completions.items())]


def write_policy_tables(res: Path, exp: str, template: str, prompts: list[dict], comps: dict[str, dict],
                        rewards: dict) -> None:
    """prompts.parquet, responses/{base,trained}.parquet and rewards/{...} (scored with the real rewards and
    the template's task metrics; math-verify in this process)."""
    metrics = TEMPLATES[template].metrics
    params = {"math_correct": {"workers": 0}} if "math_correct" in rewards else {}
    write_records(res / exp / "prompts.parquet", prompts, PROMPTS)
    ptab = pa.Table.from_pylist(prompts, schema=PROMPTS)
    for pol, c in comps.items():
        rtab = pa.Table.from_pylist(response_rows(pol, c), schema=RESPONSES)
        write_table(res / exp / "responses" / f"{pol}.parquet", rtab, RESPONSES)
        scored = score_responses(ptab, rtab, rewards, params, metrics)
        write_table(res / exp / "rewards" / f"{pol}.parquet", scored, rewards_schema(list(rewards), list(metrics)))


def _completion(template: str, ref: str | None, good: bool, rng: random.Random, q: str) -> str:
    if template == "xml_cot":
        ans = ref if good and rng.random() < 0.8 else str(rng.randint(1, 99))
        if good:
            return f"<reasoning>\nAdd the numbers in {q}\n</reasoning>\n<answer>\n{ans}\n</answer>"
        return rng.choice([f"I think it is {ans}.", f"#### {ans}", f"{NASTY} so {ans}",
                           f"<reasoning>{q}</reasoning> <answer>{ans}</answer> and more"])
    if template == "math_boxed":
        if good and rng.random() < 0.75:
            return rng.choice([f"So the answer is $\\boxed{{{ref}}}$.", "Simplify: $\\boxed{\\frac{2}{4}}$."
                               if ref == "\\frac{1}{2}" else f"$\\boxed{{{ref}}}$"])
        return rng.choice(["I do not know.", "$\\boxed{7}$", f"{NASTY} \\boxed{{3}}"])
    k = 5 if good else rng.randint(0, 3)
    body = " ".join(rng.choice(["markets", "policy", "data", "voters", "rain", "prices", "science"]) for _ in range(12))
    text = "\n".join(f"{h} {body}" for h in SECTIONS[:k])
    return text if good else f"{NASTY}\n{text}"


def write_rl_fixture(res: Path, exp: str, template: str, n_prompts: int = 10, samples: int = 3, seed: int = 0,
                     steps: int = 12) -> dict:
    """A synthetic RL experiment: prompts, responses, rewards, train_metrics and a checkpoint."""
    rng = random.Random(seed)
    if template == "xml_cot":
        pairs = [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n_prompts)]
        qs = [(f"What is {a} + {b}?", str(a + b)) for a, b in pairs]
        tasks = None
    elif template == "math_boxed":
        qs = [(f"Compute problem {i}.", rng.choice(["\\frac{1}{2}", "3", "12"])) for i in range(n_prompts)]
        tasks = [SUBJECTS[i % len(SUBJECTS)] for i in range(n_prompts)]
    else:
        qs = [(f"Headline number {i} about {NASTY}", None) for i in range(n_prompts)]
        tasks = [f"h{i}" for i in range(n_prompts)]
    prompts = prompt_rows(exp, template, qs, tasks)
    comps = {pol: {(p["prompt_id"], s): _completion(template, p["reference"], rng.random() < pgood, rng, qs[i][0])
                   for i, p in enumerate(prompts) for s in range(samples)}
             for pol, pgood in (("base", 0.25), ("trained", 0.7))}
    rewards = TEMPLATES[template].default_rewards
    write_policy_tables(res, exp, template, prompts, comps, rewards)
    write_rl_metrics(res / exp / "train_metrics.parquet", list(rewards), steps, seed)
    ck = res / exp / "checkpoints" / "final"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "model.safetensors").write_bytes(b"fake weights " + exp.encode())
    cfg = Experiment(dataset={"xml_cot": "gsm8k", "math_boxed": "math", "inner_scientist": "headlines"}[template],
                     prompt=template, model="tiny", backend="torch", algorithm="grpo", rewards=rewards,
                     train={"steps": steps})
    return {"config": cfg, "rewards": rewards}


def write_rl_metrics(path: Path, components: list[str], steps: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for s in range(steps):
        row = {"step": s, "loss": 0.05 * rng.gauss(0, 1), "reward_mean": 0.3 + 0.03 * s + 0.05 * rng.random(),
               "reward_std": 0.2 + 0.02 * rng.random(), "kl": 0.001 * s, "clip_ratio": 0.02 * rng.random(),
               "grad_norm": 0.5 + rng.random(), "lr": 1e-4, "tokens": 2000 + 10 * s, "step_seconds": 1.5 + rng.random(),
               "zero_std_frac": 0.1, "completion_len_mean": 60 + s}
        row.update({f"reward/{c}": min(1.0, 0.2 + 0.04 * s * (k + 1) / len(components))
                    for k, c in enumerate(components)})
        rows.append(row)
    write_records(path, rows, train_metrics_schema([f"reward/{c}" for c in components]))


def write_fomaml_fixture(res: Path, exp: str, steps: int = 10) -> dict:
    """train_metrics with meta/ and per-task columns, and eval/summary.json as eval_adaptation writes it."""
    rows, extra = [], ["meta/loss", "meta/avg_adaptation_gap", "meta/query_loss_pre"]
    extra += [f"{s}/{k}" for s in SUBJECTS for k in ("query_loss_pre", "query_loss_post", "adaptation_gap")]
    for t in range(steps):
        row = {"step": t, "loss": 3.0 - 0.1 * t, "reward_mean": None, "reward_std": None, "kl": None,
               "clip_ratio": None,
               "grad_norm": 1.0 / (t + 1), "lr": 1e-3, "tokens": 5000, "step_seconds": 4.0, "zero_std_frac": None,
               "completion_len_mean": None, "meta/loss": 3.0 - 0.1 * t, "meta/query_loss_pre": 3.2 - 0.1 * t,
               "meta/avg_adaptation_gap": 0.2}
        for k, s in enumerate(SUBJECTS):
            row.update({f"{s}/query_loss_pre": 3.2 - 0.1 * t, f"{s}/query_loss_post": 3.0 - 0.1 * t - 0.02 * k,
                        f"{s}/adaptation_gap": 0.2 + 0.02 * k})
        rows.append(row)
    write_records(res / exp / "train_metrics.parquet", rows, train_metrics_schema(extra))
    per = {s: {"base_query_loss": 2.5 + 0.1 * k, "meta_query_loss": 2.2 + 0.1 * k, "base_accuracy": 0.1,
               "meta_accuracy": 0.15, "base_pre_adapt_loss": 2.9, "meta_pre_adapt_loss": 2.6}
           for k, s in enumerate(SUBJECTS)}
    summary = {"experiment": exp,
               "adaptation": {"base_init_query_loss": 2.6, "meta_init_query_loss": 2.3, "per_subject": per}}
    write_json(res / exp / "eval" / "summary.json", summary)
    cfg = Experiment(dataset="math", prompt="math_boxed", model="tiny", backend="torch", algorithm="fomaml",
                     meta={"outer_steps": steps})
    return {"config": cfg, "summary": summary}
