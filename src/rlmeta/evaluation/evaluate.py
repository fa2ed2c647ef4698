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

import pandas as pd
import pyarrow as pa

from rlmeta.evaluation.stats import paired_comparison, per_prompt_means
from rlmeta.provenance import checkpoint_info, config_hash
from rlmeta.tables import PROMPTS, RESPONSES, REWARD_KEYS, is_metric_column

log = logging.getLogger(__name__)
POLICIES = ("base", "trained")
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


def _compare(frames: dict[str, pd.DataFrame], column: str, resamples: int, seed: int) -> dict:
    return paired_comparison(per_prompt_means(frames["base"], column), per_prompt_means(frames["trained"], column),
                             resamples, seed)


def _with_short_keys(c: dict) -> dict:
    """A comparison with ``base``/``trained`` keys (accuracy, format, length)."""
    return {"base": c["base_mean"], "trained": c["trained_mean"],
            **{k: c[k] for k in ("diff_mean", "diff_ci95", "n_prompts")}}


def per_subject(frames: dict[str, pd.DataFrame], accuracy: str | None) -> dict:
    """Per task (MATH subject): prompts, mean reward and accuracy of each policy."""
    out = {}
    for task in sorted(set(frames["base"]["task"].dropna()) | set(frames["trained"]["task"].dropna())):
        row = {}
        for pol, df in frames.items():
            sub = df[df["task"] == task]
            row["n_prompts"] = int(sub["prompt_id"].nunique())
            row[f"reward_{pol}"] = float(sub["reward"].mean()) if len(sub) else None
            if accuracy:
                row[f"accuracy_{pol}"] = float(sub[accuracy].mean()) if len(sub) else None
        out[task] = row
    return out


def evaluate(prompts: pa.Table, responses: dict[str, pa.Table], rewards: dict[str, pa.Table], *,
             template: str, weights: dict[str, float] | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """The comparison part of summary.json (no provenance) from the four tables of one experiment."""
    from rlmeta.prompts import TEMPLATES

    pdf = prompts.select(["prompt_id", "task"]).to_pandas()
    frames = {p: policy_frame(pdf, responses[p], rewards[p]) for p in POLICIES}
    shared = set(frames["base"]["prompt_id"]) & set(frames["trained"]["prompt_id"])
    if not shared:
        raise ValueError("base and trained share no prompt_id: nothing to compare")
    frames = {p: df[df["prompt_id"].isin(shared)].reset_index(drop=True) for p, df in frames.items()}
    n = {p: len(df) for p, df in frames.items()}
    if n["base"] != n["trained"]:
        log.warning("unequal sample counts on the shared prompts: %s", n)
    cmp = lambda col: _compare(frames, col, resamples, seed)
    summary = {
        "template": template,
        "primary_accuracy": TEMPLATES[template].primary_accuracy,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "prompt"},
        "reward": {**cmp("reward"), "n_samples": n["trained"]},
        "components": {},
        "accuracy": {},
        "format": {},
        "length": _with_short_keys(cmp("n_tokens")),
    }
    for c in components_of(rewards["trained"]):
        if c in frames["base"]:
            summary["components"][c] = {**cmp(c), "n_samples": n["trained"]}
            if weights and c in weights:
                summary["components"][c]["weight"] = float(weights[c])
    for col in frames["trained"].columns:
        kind, _, name = col.partition("/")
        if kind in ("accuracy", "format"):
            summary[kind][name] = _with_short_keys(cmp(col))
    if template == "math_boxed":
        acc = TEMPLATES[template].primary_accuracy
        summary["per_subject"] = per_subject(frames, acc if acc in frames["trained"] else None)
    return summary


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
    from rlmeta.cli import existing_dir, existing_file, settings_type
    from rlmeta.settings import Experiment

    p.add_argument("--experiment", required=True, help="experiment name (recorded in the summary)")
    p.add_argument("--config", required=True, type=settings_type(Experiment, "config"),
                   help="the experiment's config block (JSON or a file): template, weights, bootstrap; hashed")
    p.add_argument("--prompts", required=True, type=existing_file, help="prompts parquet")
    for pol in POLICIES:
        p.add_argument(f"--responses-{pol}", required=True, type=existing_file)
        p.add_argument(f"--rewards-{pol}", required=True, type=existing_file)
    p.add_argument("--checkpoint", required=True, type=existing_dir, help="trained checkpoint folder (hashed)")
    p.add_argument("--base-checkpoint", help="base policy folder or hub id (recorded; hashed when local)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--provenance", type=existing_file, help="the experiment's provenance.json (embedded)")
    p.add_argument("--out", required=True, help="output summary.json")

    def run(a):
        from rlmeta.io import read_table, write_json

        t0 = time.perf_counter()
        exp = a.config
        tables = {"responses": {}, "rewards": {}}
        for pol in POLICIES:
            tables["responses"][pol] = read_table(getattr(a, f"responses_{pol}"), RESPONSES)
            tables["rewards"][pol] = read_table(getattr(a, f"rewards_{pol}"))
        summary = evaluate(read_table(a.prompts, PROMPTS), tables["responses"], tables["rewards"], template=exp.prompt,
                           weights=exp.reward_weights, resamples=exp.eval.bootstrap, seed=a.seed)
        summary.update(experiment=a.experiment, config_hash=config_hash(exp.model_dump(mode="json")),
                       checkpoint=checkpoint_info(a.checkpoint))
        if a.base_checkpoint:
            summary["base_checkpoint"] = checkpoint_info(a.base_checkpoint)
        if a.provenance:
            summary["provenance"] = json.loads(Path(a.provenance).read_text())
        write_json(a.out, no_nan(summary))
        r = summary["reward"]
        log.info("%s: reward base %.4f trained %.4f diff %+.4f [%.4f, %.4f] over %d prompts -> %s in %.1fs",
                 a.experiment, r["base_mean"], r["trained_mean"], r["diff_mean"], *r["diff_ci95"], r["n_prompts"],
                 a.out, time.perf_counter() - t0)
    return run
