"""The one scoring path: rewards, their weighted total and task metrics of a batch of completions.

``score`` is what the score step, both trainers, the evaluation and ``rlmeta inspect`` call. Each
distinct scorer runs once per completion: a task metric that is also a reward (``math_correct`` is
both the MATH reward and ``accuracy/math_verify``) reuses the reward's values, so math-verify runs
once. ``reward_params`` apply to a scorer wherever it is used.

``score_responses`` turns a responses table into a rewards table (``rewards/<policy>.parquet``):
keys, the weighted ``reward``, one column per reward component (unweighted) and one per task
metric of the template (``accuracy/<name>``, ``format/<name>``), so evaluation reads accuracies
instead of computing them again.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rlmeta.rewards import REGISTRY, unknown_rewards
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Scores of N completions: ``total`` [N], ``components`` {reward: [N]}, ``metrics`` {column: [N]}."""

    total: np.ndarray
    components: dict[str, np.ndarray]
    metrics: dict[str, np.ndarray]


def score(completions: Sequence[str], references: Sequence[str | None] | None, prompts: Sequence | None,
          rewards: dict[str, float], params: dict[str, dict] | None = None,
          metrics: dict[str, str] | None = None) -> Scores:
    """Weighted total, unweighted components and task metrics (column -> scorer) of the completions."""
    params = params or {}
    metrics = metrics or {}
    unknown_rewards(list(rewards) + list(metrics.values()))
    values: dict[str, np.ndarray] = {}
    for name in [*rewards, *metrics.values()]:
        if name not in values:
            values[name] = REGISTRY[name].score(completions, references, prompts, params.get(name))
    total = np.zeros(len(completions), dtype=np.float64)
    for name, weight in rewards.items():
        total += weight * values[name]
    return Scores(total, {n: values[n] for n in rewards}, {col: values[n] for col, n in metrics.items()})


def score_responses(prompts_table: pa.Table, responses_table: pa.Table, rewards: dict[str, float],
                    params: dict | None = None, metrics: dict[str, str] | None = None) -> pa.Table:
    """One rewards row per response, in response order (schema ``rewards_schema(rewards, metrics)``)."""
    prompts = {r["prompt_id"]: r for r in prompts_table.select(["prompt_id", "prompt", "reference"]).to_pylist()}
    resp = responses_table.select(["prompt_id", "sample_idx", "policy", "completion"]).to_pylist()
    missing = sorted({r["prompt_id"] for r in resp} - prompts.keys())
    if missing:
        from rlmeta.errors import UserError

        raise UserError(f"{len(missing)} response prompt_id(s) are not in the prompts table (e.g. {missing[:3]}): "
                        "the responses belong to another experiment's prompts")
    s = score([r["completion"] for r in resp], [prompts[r["prompt_id"]]["reference"] for r in resp],
              [prompts[r["prompt_id"]]["prompt"] for r in resp], rewards, params, metrics)
    data = {k: [r[k] for r in resp] for k in ("prompt_id", "sample_idx", "policy")}
    data["reward"] = s.total
    data.update(s.components)
    data.update(s.metrics)
    return pa.table(data, schema=rewards_schema(list(rewards), list(metrics or {})))


def command(p: argparse.ArgumentParser):
    """``rlmeta score``: score a responses parquet against its prompts and write the rewards parquet."""
    from rlmeta.cli import existing_file, settings_type
    from rlmeta.prompts import TEMPLATES
    from rlmeta.settings import RewardMix

    p.add_argument("--prompts", required=True, type=existing_file, help="prompts parquet")
    p.add_argument("--responses", required=True, type=existing_file, help="responses parquet")
    p.add_argument("--out", required=True, help="output rewards parquet")
    p.add_argument("--template", required=True, choices=sorted(TEMPLATES),
                   help="prompt template: gives the task metrics (accuracy/format columns)")
    p.add_argument("--rewards", required=True, type=settings_type(RewardMix, "rewards"),
                   help='{"rewards": {name: weight}, "reward_params": {name: {param: value}}} as JSON or a file')

    def run(a):
        from rlmeta.io import read_table, write_table

        t0 = time.perf_counter()
        metrics = TEMPLATES[a.template].metrics
        table = score_responses(read_table(a.prompts, PROMPTS), read_table(a.responses, RESPONSES),
                                a.rewards.rewards, a.rewards.reward_params, metrics)
        write_table(a.out, table, rewards_schema(list(a.rewards.rewards), list(metrics)))
        means = {c: round(float(np.mean(table.column(c).to_numpy())), 4) if table.num_rows else None
                 for c in ["reward", *a.rewards.rewards, *metrics]}
        log.info("scored %d responses -> %s in %.2fs; means %s", table.num_rows, a.out, time.perf_counter() - t0, means)
    return run
