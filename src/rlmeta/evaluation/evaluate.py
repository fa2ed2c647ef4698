"""Base versus trained on the same held-out prompts -> ``results/<exp>/eval/summary.json``.

Every number is a paired comparison over prompts (``rlmeta.evaluation.stats``): the total
reward and each reward component, the template's task accuracies and format rates (columns the
score step wrote next to the rewards, so nothing is scored twice), and mean completion length in
tokens. See docs/evaluation.md for the meaning of each field.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rlmeta.errors import UserError
from rlmeta.evaluation.stats import across_runs, paired_comparison, per_prompt_means
from rlmeta.provenance import checkpoint_info, config_hash
from rlmeta.tables import PROMPTS, RESPONSES, REWARD_KEYS, is_metric_column

log = logging.getLogger(__name__)
KEYS = ["prompt_id", "sample_idx"]


def components_of(rewards: pa.Table) -> list[str]:
    """Reward component columns of a rewards table (after the keys and total, before the task metrics)."""
    keys = {f.name for f in REWARD_KEYS}
    return [c for c in rewards.column_names if c not in keys and not is_metric_column(c)]


def metrics_of(rewards: pa.Table) -> list[str]:
    """Task-metric columns of a rewards table (``accuracy/<name>``, ``format/<name>``)."""
    return [c for c in rewards.column_names if is_metric_column(c)]


def policy_frame(prompts: pd.DataFrame, responses: pa.Table, rewards: pa.Table) -> pd.DataFrame:
    """One row per completion: keys, task, n_tokens, finish_reason, reward columns and task metrics."""
    resp = responses.select(KEYS + ["completion", "n_tokens", "finish_reason"]).to_pandas()
    rew = rewards.select(KEYS + ["reward"] + components_of(rewards) + metrics_of(rewards)).to_pandas()
    df = resp.merge(rew, on=KEYS, how="inner", validate="one_to_one")
    if len(df) < len(resp):
        log.warning("%d responses have no rewards row; they are left out", len(resp) - len(df))
    df = df.merge(prompts[["prompt_id", "task"]], on="prompt_id", how="left")
    df["format/stopped"] = (df["finish_reason"] == "stop").astype(float)
    return df


def sample_counts(frames: dict[str, pd.DataFrame]) -> int:
    """The k range of pass@k/maj@k: the fewest samples any policy has on any shared prompt."""
    return int(min(df.groupby("prompt_id").size().min() for df in frames.values()))


def prompt_values(df: pd.DataFrame, components: list[str], ks: list[int], answers: dict[str, str]) -> dict:
    """Per-prompt values (Series indexed by prompt_id) of every compared quantity of one policy.

    Keys: ``reward``, ``component/<c>``, ``accuracy/<m>``, ``format/<m>``, ``length``, and for each accuracy
    with an answer extractor (``answers``: column -> scorer) ``pass@<k>/<m>`` and ``maj@<k>/<m>``."""
    from rlmeta.evaluation.sampling import per_prompt
    from rlmeta.rewards import REGISTRY

    out = {"reward": per_prompt_means(df, "reward"), "length": per_prompt_means(df, "n_tokens")}
    out |= {f"component/{c}": per_prompt_means(df, c) for c in components if c in df}
    out |= {col: per_prompt_means(df, col) for col in df.columns if col.startswith(("accuracy/", "format/"))}
    ordered = df.sort_values(["prompt_id", "sample_idx"])
    for col, scorer in answers.items():
        if col not in df:
            continue
        extract = REGISTRY[scorer].answer  # a list, not a column: pandas would turn "no answer" (None) into NaN
        rows = {pid: per_prompt([(extract(c), x) for c, x in zip(g["completion"], g[col])], ks)
                for pid, g in ordered.groupby("prompt_id", sort=True)}
        name = col.removeprefix("accuracy/")
        for kind in ("pass", "maj"):
            for k in ks:
                out[f"{kind}@{k}/{name}"] = pd.Series({pid: r[kind][k] for pid, r in rows.items()}, dtype=float)
    return out


USUAL_CANDIDATES = 3
"""Answers per policy (its most frequent ones) tried as the constant answer of ``usual_answer``."""


def usual_answer(frames: dict[str, pd.DataFrame], prompts: pa.Table, column: str, scorer: str,
                 top: int = USUAL_CANDIDATES) -> dict | None:
    """The accuracy of always giving one answer, the bar a policy must clear to have learned more than the
    usual answer (letter counting, gold "1" for 76% of its items, was "learned" that way).

    Candidates are the ``top`` most frequent extracted answers of each policy's samples; a completion that
    gives the candidate is scored, with the accuracy's own scorer (``score`` with ``metrics={column:
    scorer}``), against every compared prompt's reference, and the per-prompt results are averaged as the
    accuracy is. Returns ``{"metric", "answer", "accuracy", "share" (of each policy's samples giving it),
    "candidates" (answer -> accuracy)}``, or None when no sample has an answer."""
    from collections import Counter

    from rlmeta.rewards import REGISTRY
    from rlmeta.scoring import score

    extract = REGISTRY[scorer].answer
    example: dict[str, str] = {}
    answers = {p: [extract(c) for c in df["completion"]] for p, df in frames.items()}
    chosen: list[str] = []
    for p, df in frames.items():
        counts = Counter(a for a in answers[p] if a is not None)
        for a, _ in counts.most_common(top):
            if a not in example:
                example[a] = next(c for c, x in zip(df["completion"], answers[p]) if x == a)
                chosen.append(a)
    if not chosen:
        return None
    ids = sorted(set(next(iter(frames.values()))["prompt_id"]))
    rows = {r["prompt_id"]: r for r in prompts.select(["prompt_id", "prompt", "reference"]).to_pylist()}
    refs, msgs = [rows[i]["reference"] for i in ids], [rows[i]["prompt"] for i in ids]
    acc = {a: float(np.mean(score([example[a]] * len(ids), refs, msgs, {}, None, {column: scorer}).metrics[column]))
           for a in chosen}
    best = max(chosen, key=lambda a: acc[a])  # ties: the first candidate (the base's most frequent answer)
    return {"metric": column, "answer": best, "accuracy": acc[best],
            "share": {p: sum(x == best for x in v) / len(v) for p, v in answers.items()}, "candidates": acc}


def usual_answer_warning(summary: dict) -> str | None:
    """A warning when the trained policy's primary accuracy is no higher than always giving the usual answer
    (``summary["usual_answer"]``); None otherwise."""
    u = summary.get("usual_answer")
    primary = summary.get("primary_accuracy")
    c = lookup(summary, primary) if u and primary else None
    if not c or c.get("trained") is None or c["trained"] > u["accuracy"]:
        return None
    share = float(np.mean([v for p, v in u["share"].items() if p != "base"]))
    text = (f"The trained accuracy {primary.removeprefix('accuracy/')} ({c['trained']:.3f}) is no higher than always "
            f"answering \"{u['answer']}\" ({u['accuracy']:.3f}; {share:.0%} of the trained samples give that answer): ")
    if share >= 0.5:
        return text + "the policy may have learned the usual answer, not the task."
    return text + "a constant answer does as well, so this accuracy shows no skill at the task."


def _mean_of_runs(runs: dict[str, dict]) -> dict:
    """Per-prompt values of the trained policy across runs: each quantity's mean over the seeds (equal
    sample counts make it the pooled mean)."""
    first = next(iter(runs.values()))
    return {q: pd.concat([r[q] for r in runs.values() if q in r], axis=1).mean(axis=1) for q in first}


def comparisons(base: dict, trained: dict, resamples: int, seed: int, n_samples: int,
                weights: dict | None) -> dict:
    """The summary's comparison blocks (reward, components, accuracy, format, length, pass/maj@k) of base
    against one trained policy's per-prompt values."""
    cmp = lambda q: paired_comparison(base[q], trained[q], resamples, seed)
    out = {"reward": {**cmp("reward"), "n_samples": n_samples}, "components": {}, "accuracy": {}, "format": {},
           "length": _with_short_keys(cmp("length")), "pass_at_k": {}, "maj_at_k": {}}
    for q in trained:
        if q not in base:
            continue
        kind, _, name = q.partition("/")
        if kind == "component":
            out["components"][name] = {**cmp(q), "n_samples": n_samples}
            if weights and name in weights:
                out["components"][name]["weight"] = float(weights[name])
        elif kind in ("accuracy", "format"):
            out[kind][name] = _with_short_keys(cmp(q))
        elif kind.startswith(("pass@", "maj@")):
            what, k = kind.split("@")
            out[f"{what}_at_k"].setdefault(name, {})[k] = _with_short_keys(cmp(q))
    return out


def _with_short_keys(c: dict) -> dict:
    """A comparison with ``base``/``trained`` keys (accuracy, format, length, pass/maj@k)."""
    return {"base": c["base_mean"], "trained": c["trained_mean"],
            **{k: c[k] for k in ("diff_mean", "diff_ci95", "n_prompts")}}


def across_seeds(base: dict, runs: dict[str, dict], resamples: int, seed: int) -> dict:
    """Per quantity: every seed's paired difference (trained - base, mean over prompts) and their spread
    across seeds (``rlmeta.evaluation.stats.across_runs``)."""
    out = {}
    for q in next(iter(runs.values())):
        if q in base:
            diffs = {s: float((r[q] - base[q]).dropna().mean()) for s, r in runs.items()}
            out[q] = across_runs(diffs, resamples, seed)
    return out


def per_subject(frames: dict[str, pd.DataFrame], accuracy: str | None) -> dict:
    """Per task (MATH subject): prompts, mean reward and accuracy of each policy (trained: every run pooled)."""
    pooled = {"base": frames["base"], "trained": pd.concat([df for p, df in frames.items() if p != "base"])}
    out = {}
    for task in sorted(set(pooled["base"]["task"].dropna()) | set(pooled["trained"]["task"].dropna())):
        row = {}
        for pol, df in pooled.items():
            sub = df[df["task"] == task]
            row["n_prompts"] = int(sub["prompt_id"].nunique())
            row[f"reward_{pol}"] = float(sub["reward"].mean()) if len(sub) else None
            if accuracy:
                row[f"accuracy_{pol}"] = float(sub[accuracy].mean()) if len(sub) else None
        out[task] = row
    return out


def evaluate(prompts: pa.Table, responses: dict[str, pa.Table], rewards: dict[str, pa.Table], *,
             template: str, weights: dict[str, float] | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """The comparison part of summary.json (no provenance) of one experiment.

    ``responses`` and ``rewards`` hold ``base`` and one table per trained run (key: the run's label, e.g.
    ``seed1234``; a single run may be ``trained``). The top-level blocks compare base with the runs'
    mean per prompt; ``runs`` has each run's own comparison and ``across_seeds`` the spread of the
    per-run differences."""
    from rlmeta.prompts import TEMPLATES

    labels = [p for p in responses if p != "base"]
    if not labels:
        raise ValueError("no trained run to compare with base")
    pdf = prompts.select(["prompt_id", "task"]).to_pandas()
    frames = {p: policy_frame(pdf, responses[p], rewards[p]) for p in ["base", *labels]}
    shared = set.intersection(*(set(df["prompt_id"]) for df in frames.values()))
    if not shared:
        raise ValueError("base and trained share no prompt_id: nothing to compare")
    frames = {p: df[df["prompt_id"].isin(shared)].reset_index(drop=True) for p, df in frames.items()}
    n = {p: len(df) for p, df in frames.items()}
    if len(set(n.values())) > 1:
        log.warning("unequal sample counts on the shared prompts: %s", n)
    tpl = TEMPLATES[template]
    components = components_of(rewards[labels[0]])
    answers = {col: name for col, name in tpl.metrics.items() if col.startswith("accuracy/")}
    ks = list(range(1, sample_counts(frames) + 1))
    values = {p: prompt_values(df, components, ks, answers) for p, df in frames.items()}
    runs = {p: values[p] for p in labels}
    summary = {
        "template": template,
        "primary_accuracy": tpl.primary_accuracy,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "prompt"},
        "runs_compared": labels,
        **comparisons(values["base"], _mean_of_runs(runs), resamples, seed, n[labels[0]], weights),
        "runs": {p: comparisons(values["base"], runs[p], resamples, seed, n[p], weights) for p in labels},
        "across_seeds": across_seeds(values["base"], runs, resamples, seed),
    }
    primary = tpl.primary_accuracy
    if primary in answers and primary in frames["base"] and _has_answer(answers[primary]):
        summary["usual_answer"] = usual_answer(frames, prompts, primary, answers[primary])
    if template == "math_boxed":
        summary["per_subject"] = per_subject(frames, primary if primary in frames[labels[0]] else None)
    return summary


def _has_answer(scorer: str) -> bool:
    from rlmeta.rewards import REGISTRY

    return REGISTRY[scorer].answer is not None


def lookup(block: dict, q: str) -> dict | None:
    """The comparison of quantity ``q`` (a key of ``prompt_values``) in a summary block (the top level or
    ``runs[label]``): ``reward``, ``length``, ``component/<c>``, ``accuracy/<m>``, ``format/<m>``,
    ``pass@<k>/<m>``, ``maj@<k>/<m>``; None when absent."""
    if q in ("reward", "length"):
        return block.get(q)
    kind, _, name = q.partition("/")
    if kind == "component":
        return block.get("components", {}).get(name)
    if kind in ("accuracy", "format"):
        return block.get(kind, {}).get(name)
    if "@" in kind:
        what, k = kind.split("@")
        return block.get(f"{what}_at_k", {}).get(name, {}).get(k)
    return None


def diff_of(c: dict | None) -> tuple[float | None, list | None]:
    """(difference, 95% interval) of a comparison, whichever key style it uses."""
    return (None, None) if c is None else (c.get("diff_mean"), c.get("diff_ci95"))


def headline_quantities(summary: dict) -> list[str]:
    """What a report leads with, in order: the primary accuracy, its pass@k and maj@k at the largest k, then
    the total reward (the reward alone where the template has no accuracy)."""
    primary = summary.get("primary_accuracy")
    name = primary.removeprefix("accuracy/") if primary else None
    if not name or name not in summary.get("accuracy", {}):
        return ["reward"]
    ks = sorted(int(k) for k in summary.get("pass_at_k", {}).get(name, {}))
    top = [f"pass@{ks[-1]}/{name}", f"maj@{ks[-1]}/{name}"] if ks and ks[-1] > 1 else []
    return [primary, *top, "reward"]


def reward_gaming(summary: dict) -> str | None:
    """A warning when the reward rose (95% interval above 0) while the primary accuracy fell (interval below
    0), naming the reward components that rose; None otherwise."""
    primary = summary.get("primary_accuracy")
    if not primary:
        return None
    _, r_ci = diff_of(summary.get("reward"))
    a_diff, a_ci = diff_of(lookup(summary, primary))
    if not (r_ci and a_ci and None not in r_ci and None not in a_ci and r_ci[0] > 0 and a_ci[1] < 0):
        return None
    rose = [f"{n} ({c['diff_mean']:+.3f})" for n, c in summary.get("components", {}).items()
            if c.get("diff_ci95") and c["diff_ci95"][0] is not None and c["diff_ci95"][0] > 0]
    return (f"The reward rose ({summary['reward']['diff_mean']:+.3f}, 95% CI [{r_ci[0]:+.3f}, {r_ci[1]:+.3f}]) while "
            f"the task accuracy {primary.removeprefix('accuracy/')} fell ({a_diff:+.3f}, 95% CI [{a_ci[0]:+.3f}, "
            f"{a_ci[1]:+.3f}]): the policy learned the reward, not the task. Components that rose: "
            + (", ".join(rose) if rose else "none on its own") + ".")


def no_nan(obj):
    """Replace NaN floats by None, recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return obj


def command(p: argparse.ArgumentParser):
    """``rlmeta evaluate``: write an RL experiment's eval/summary.json."""
    from rlmeta.cli import existing_file, settings_type
    from rlmeta.settings import Experiment

    p.add_argument("--experiment", required=True, help="experiment name (recorded in the summary)")
    p.add_argument("--config", required=True, type=settings_type(Experiment, "config"),
                   help="the experiment's config block (JSON or a file): template, weights, bootstrap; hashed")
    p.add_argument("--prompts", required=True, type=existing_file, help="prompts parquet")
    p.add_argument("--responses-base", required=True, type=existing_file, help="responses/base.parquet")
    p.add_argument("--rewards-base", required=True, type=existing_file, help="rewards/base.parquet")
    p.add_argument("--run", nargs=4, action="append", required=True,
                   metavar=("LABEL", "RESPONSES", "REWARDS", "CHECKPOINT"),
                   help="a trained run: its label (seed<N>), responses and rewards parquet and checkpoint folder "
                        "(hashed); repeat for each training seed")
    p.add_argument("--base-checkpoint", help="base policy folder or hub id (recorded; hashed when local)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--provenance", type=existing_file, help="the experiment's provenance.json (embedded)")
    p.add_argument("--out", required=True, help="output summary.json")

    def run(a):
        from rlmeta.io import read_table, write_json

        t0 = time.perf_counter()
        exp = a.config
        labels = [label for label, *_ in a.run]
        if len(set(labels)) != len(labels) or "base" in labels:
            raise UserError(f"--run labels must be distinct and not 'base', got {labels}")
        for label, *paths in a.run:
            for path, kind in zip(paths, (Path.is_file, Path.is_file, Path.is_dir)):
                if not kind(Path(path)):
                    raise UserError(f"--run {label}: {path}: no such {'folder' if kind is Path.is_dir else 'file'}")
        responses = {"base": read_table(a.responses_base, RESPONSES)}
        rewards = {"base": read_table(a.rewards_base)}
        for label, resp, rew, _ in a.run:
            responses[label] = read_table(resp, RESPONSES)
            rewards[label] = read_table(rew)
        summary = evaluate(read_table(a.prompts, PROMPTS), responses, rewards, template=exp.prompt,
                           weights=exp.reward_weights, resamples=exp.eval.bootstrap, seed=a.seed)
        checkpoints = {label: checkpoint_info(ck) for label, _, _, ck in a.run}
        summary.update(experiment=a.experiment, config_hash=config_hash(exp.model_dump(mode="json")),
                       checkpoint=checkpoints[labels[0]], checkpoints=checkpoints)
        if a.base_checkpoint:
            summary["base_checkpoint"] = checkpoint_info(a.base_checkpoint)
        if a.provenance:
            summary["provenance"] = json.loads(Path(a.provenance).read_text())
        write_json(a.out, no_nan(summary))
        r = summary["reward"]
        log.info("%s: reward base %.4f trained %.4f diff %+.4f [%.4f, %.4f] over %d prompts, %d run(s) -> %s in %.1fs",
                 a.experiment, r["base_mean"], r["trained_mean"], r["diff_mean"], *r["diff_ci95"], r["n_prompts"],
                 len(labels), a.out, time.perf_counter() - t0)
    return run
