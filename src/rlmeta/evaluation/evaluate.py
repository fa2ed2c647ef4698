"""Base versus trained on the same held-out prompts -> ``results/<exp>/eval/summary.json``.

Every number is a paired comparison over prompts (``rlmeta.evaluation.stats``): the total
reward and each reward component, task accuracies and format rates
(``rlmeta.evaluation.task_metrics``), and mean completion length in tokens. See
docs/evaluation.md for the meaning of each field.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

from rlmeta.evaluation.stats import paired_comparison, per_prompt_means
from rlmeta.evaluation.task_metrics import METRICS, completion_metrics, infer_template
from rlmeta.tables import PROMPTS, RESPONSES, REWARD_KEYS

log = logging.getLogger(__name__)
POLICIES = ("base", "trained")
KEYS = ["prompt_id", "sample_idx"]


def components_of(rewards: pa.Table) -> list[str]:
    """Reward component columns of a rewards table (everything after the keys and total)."""
    keys = {f.name for f in REWARD_KEYS}
    return [c for c in rewards.column_names if c not in keys]


def policy_frame(prompts: pd.DataFrame, responses: pa.Table, rewards: pa.Table, template: str,
                 workers: int = 2, timeout_s: float = 5.0) -> pd.DataFrame:
    """One row per completion: keys, task, n_tokens, finish_reason, reward columns and task metrics."""
    resp = responses.select(KEYS + ["completion", "n_tokens", "finish_reason"]).to_pandas()
    rew = rewards.select(KEYS + ["reward"] + components_of(rewards)).to_pandas()
    df = resp.merge(rew, on=KEYS, how="inner", validate="one_to_one")
    if len(df) < len(resp):
        log.warning("%d responses have no rewards row; they are left out", len(resp) - len(df))
    df = df.merge(prompts[["prompt_id", "task", "reference"]], on="prompt_id", how="left")
    refs = [None if r is None or (isinstance(r, float) and math.isnan(r)) else r for r in df["reference"]]
    for name, vals in completion_metrics(template, df["completion"].tolist(), refs, workers, timeout_s).items():
        df[name] = vals
    df["format/stopped"] = (df["finish_reason"] == "stop").astype(float)
    return df


def _compare(frames: dict[str, pd.DataFrame], column: str, resamples: int, seed: int) -> dict:
    return paired_comparison(per_prompt_means(frames["base"], column), per_prompt_means(frames["trained"], column),
                             resamples, seed)


def _with_short_keys(c: dict) -> dict:
    """A comparison with ``base``/``trained`` keys (accuracy, format, length)."""
    return {"base": c["base_mean"], "trained": c["trained_mean"], **{k: c[k] for k in ("diff_mean", "diff_ci95", "n_prompts")}}


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
             template: str | None = None, weights: dict[str, float] | None = None, resamples: int = 2000,
             seed: int = 0, workers: int = 2, timeout_s: float = 5.0) -> dict:
    """The comparison part of summary.json (no provenance) from the four tables of one experiment."""
    pdf = prompts.select(["prompt_id", "task", "prompt", "reference"]).to_pandas()
    if template is None:
        first = pdf["prompt"].iloc[0] if len(pdf) else []
        template = infer_template(next((m["content"] for m in first if m["role"] == "system"), None))
    frames = {p: policy_frame(pdf, responses[p], rewards[p], template, workers, timeout_s) for p in POLICIES}
    shared = set(frames["base"]["prompt_id"]) & set(frames["trained"]["prompt_id"])
    if not shared:
        raise ValueError("base and trained share no prompt_id: nothing to compare")
    frames = {p: df[df["prompt_id"].isin(shared)].reset_index(drop=True) for p, df in frames.items()}
    n = {p: len(df) for p, df in frames.items()}
    if n["base"] != n["trained"]:
        log.warning("unequal sample counts on the shared prompts: %s", n)
    cmp = lambda col: _compare(frames, col, resamples, seed)  # noqa: E731
    summary = {
        "template": template,
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
        acc = "accuracy/math_verify" if "accuracy/math_verify" in frames["trained"] else None
        summary["per_subject"] = per_subject(frames, acc)
    return summary


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_info(path: str | Path) -> dict:
    """Path and sha256 of a checkpoint's model.safetensors (of its sorted shards when sharded;
    null when the folder holds none, e.g. a hub id)."""
    p = Path(path)
    single = p / "model.safetensors"
    files = [single] if single.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return {"path": str(path), "sha256": None}
    if len(files) == 1:
        return {"path": str(path), "sha256": file_sha256(files[0])}
    digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()
    return {"path": str(path), "sha256": digest, "shards": [f.name for f in files]}


def config_hash(config_block: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of an experiment's config block."""
    return hashlib.sha256(json.dumps(config_block, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def no_nan(obj):
    """Replace NaN floats by None, recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """CLI: write an RL experiment's eval/summary.json."""
    from rlmeta.io import read_table, write_json

    p = argparse.ArgumentParser(prog="evaluate.py", description="Paired base-versus-trained evaluation of one experiment.")
    p.add_argument("--experiment", required=True, help="experiment name (recorded in the summary)")
    p.add_argument("--prompts", required=True, help="prompts parquet")
    p.add_argument("--responses-base", required=True)
    p.add_argument("--responses-trained", required=True)
    p.add_argument("--rewards-base", required=True)
    p.add_argument("--rewards-trained", required=True)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint folder (hashed for provenance)")
    p.add_argument("--base-checkpoint", help="base policy folder or hub id (recorded; hashed when local)")
    p.add_argument("--config-json", default="{}", help="the experiment's config block as JSON (hashed; gives template and weights)")
    p.add_argument("--template", choices=sorted(METRICS), help="default: the config's prompt, else inferred from the prompts")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="math-verify worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="math-verify seconds per answer (default 5)")
    p.add_argument("--out", required=True, help="output summary.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    cfg = json.loads(a.config_json)
    tables = {"responses": {}, "rewards": {}}
    for pol in POLICIES:
        tables["responses"][pol] = read_table(getattr(a, f"responses_{pol}"), RESPONSES)
        tables["rewards"][pol] = read_table(getattr(a, f"rewards_{pol}"))
    summary = evaluate(read_table(a.prompts, PROMPTS), tables["responses"], tables["rewards"],
                       template=a.template or cfg.get("prompt"), weights=cfg.get("rewards"),
                       resamples=a.bootstrap, seed=a.seed, workers=a.workers, timeout_s=a.timeout)
    summary.update(experiment=a.experiment, config_hash=config_hash(cfg), checkpoint=checkpoint_info(a.checkpoint))
    if a.base_checkpoint:
        summary["base_checkpoint"] = checkpoint_info(a.base_checkpoint)
    write_json(a.out, no_nan(summary))
    r = summary["reward"]
    log.info("%s: reward base %.4f trained %.4f diff %+.4f [%.4f, %.4f] over %d prompts -> %s in %.1fs",
             a.experiment, r["base_mean"], r["trained_mean"], r["diff_mean"], *r["diff_ci95"], r["n_prompts"],
             a.out, time.perf_counter() - t0)
    return 0
