"""Synthetic experiment folders with the real table schemas, for the evaluation and report tests:
RL experiments (prompts, responses and rewards scored with the real rewards; per training seed train_metrics,
eval_curve, rollouts and a fake checkpoint) and FOMAML experiments (meta-training metrics, the adaptation summary)."""
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


def _completion(template: str, ref: str | None, good: bool, rng: random.Random, q: str, gaming: bool = False) -> str:
    """A synthetic completion; ``gaming``: well formatted (high format reward) with a wrong answer."""
    if template == "xml_cot":
        ans = ref if good and not gaming and rng.random() < 0.8 else str(1000 + rng.randint(1, 99))
        if good or gaming:
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
                     steps: int = 12, seeds=(1234,), gaming: bool = False) -> dict:
    """A synthetic RL experiment in the workflow's layout: prompts, responses and rewards of the base policy and
    of each training seed (``responses/seed<N>.parquet``...), and per seed ``seed<N>/`` with train_metrics,
    eval_curve, rollouts/ and a fake checkpoint. ``gaming`` (xml_cot): the trained completions are well formatted
    with wrong answers (reward up, accuracy down)."""
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
    labels = [f"seed{s}" for s in seeds]
    comps = {}
    for pol, pgood in (("base", 0.25), *((label, 0.7) for label in labels)):
        r = random.Random(f"{seed}/{pol}")
        comps[pol] = {(p["prompt_id"], s): _completion(template, p["reference"], r.random() < pgood, r, qs[i][0],
                                                       gaming=gaming and pol != "base")
                      for i, p in enumerate(prompts) for s in range(samples)}
        if gaming and pol == "base":  # right half the time, in a bare answer tag (little format reward)
            comps[pol] = {(p["prompt_id"], s): f"<answer>{p['reference']}</answer>" if (i + s) % 2 else
                          f"I think it is {1000 + i}." for i, p in enumerate(prompts) for s in range(samples)}
    rewards = TEMPLATES[template].default_rewards
    write_policy_tables(res, exp, template, prompts, comps, rewards)
    metrics = list(TEMPLATES[template].metrics)
    for k, label in enumerate(labels):
        d = res / exp / label
        write_rl_metrics(d / "train_metrics.parquet", list(rewards), steps, seed + k)
        write_eval_curve(d / "eval_curve.parquet", list(rewards), metrics, steps, seed + k)
        write_rollouts(d / "rollouts", list(rewards), prompts, steps, seed + k, template)
        ck = d / "checkpoints" / "final"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "model.safetensors").write_bytes(b"fake weights " + f"{exp}/{label}".encode())
    cfg = Experiment(dataset={"xml_cot": "gsm8k", "math_boxed": "math", "inner_scientist": "headlines"}[template],
                     prompt=template, model="tiny", backend="torch", algorithm="grpo", rewards=rewards,
                     train={"steps": steps}, seeds=list(seeds) if len(seeds) > 1 or seeds[0] != 1234 else None)
    return {"config": cfg, "rewards": rewards, "runs": labels}


def write_eval_curve(path: Path, rewards: list[str], metrics: list[str], steps: int, seed: int = 0,
                     every: int = 4) -> None:
    """eval_curve.parquet rows at 0, every ``every`` steps and the last (the trainers' schedule)."""
    from rlmeta.tables import eval_curve_schema

    rng = random.Random(seed)
    rows = []
    for s in sorted({0, steps, *range(every, steps + 1, every)}):
        row = {"step": s, "seconds": 0.5, "n_prompts": 16, "reward": 0.3 + 0.02 * s + 0.02 * rng.random(),
               "completion_len_mean": 40.0 + s, "truncated_frac": 0.1}
        row.update({f"reward/{r}": 0.2 + 0.01 * s for r in rewards})
        row.update({m: min(1.0, 0.1 + 0.01 * s) for m in metrics})
        rows.append(row)
    write_records(path, rows, eval_curve_schema(rewards, metrics))


def write_rollouts(folder: Path, rewards: list[str], prompts: list[dict], steps: int, seed: int, template: str,
                   group_size: int = 4, every: int = 5) -> None:
    """rollouts/steps-<first>-<last>.parquet, one file per ``every`` steps, two groups per step."""
    from rlmeta.tables import rollouts_schema

    rng = random.Random(seed)
    rows = []
    for s in range(steps):
        for g in range(2):
            p = prompts[(2 * s + g) % len(prompts)]
            for k in range(group_size):
                good = rng.random() < 0.3 + 0.05 * s
                r = {"step": s, "prompt_id": p["prompt_id"], "group": g, "sample_idx": k,
                     "completion": _completion(template, p["reference"], good, rng, "q"), "reward": float(good),
                     "advantage": 0.0, "n_tokens": 10 + k, "truncated": False}
                r.update({f"reward/{n}": float(good) for n in rewards})
                rows.append(r)
    for first in range(0, steps, every):
        chunk = [r for r in rows if first <= r["step"] < first + every]
        last = max(r["step"] for r in chunk)
        write_records(folder / f"steps-{first:06d}-{last:06d}.parquet", chunk, rollouts_schema(rewards))


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


def evaluate_args(d: Path, labels) -> list[str]:
    """``rlmeta evaluate``'s table arguments for a fixture experiment folder ``d`` and its runs."""
    return [*_base_args(d), *(x for label in labels for x in (
        "--run", label, str(d / f"responses/{label}.parquet"), str(d / f"rewards/{label}.parquet"),
        str(d / label / "checkpoints/final")))]


def report_args(d: Path, labels) -> list[str]:
    """``rlmeta report``'s table arguments (RL) for a fixture experiment folder ``d`` and its runs."""
    return [*_base_args(d), *(x for label in labels for x in (
        "--run", label, str(d / label / "train_metrics.parquet"), str(d / label / "eval_curve.parquet"),
        str(d / label / "rollouts"), str(d / f"responses/{label}.parquet"), str(d / f"rewards/{label}.parquet")))]


def _base_args(d: Path) -> list[str]:
    return ["--prompts", str(d / "prompts.parquet"), "--responses-base", str(d / "responses/base.parquet"),
            "--rewards-base", str(d / "rewards/base.parquet")]
