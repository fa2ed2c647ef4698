"""Score a responses table with an experiment's rewards (``rewards/<policy>.parquet``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import pyarrow as pa

from rlmeta.rewards import REGISTRY, math_verify_batch, unknown_rewards
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema

log = logging.getLogger(__name__)


def score_responses(prompts_table: pa.Table, responses_table: pa.Table, rewards: dict[str, float],
                    params: dict | None = None, workers: int = 2) -> pa.Table:
    """One rewards row per response, in response order (schema ``rewards_schema(list(rewards))``).

    ``reward`` is the weighted sum; component columns hold unweighted values. ``math_correct``
    runs through ``math_verify_batch`` (``params['math_correct']['timeout_s']``, default 5 s).
    """
    unknown_rewards(list(rewards) + list(params or {}))
    params = params or {}
    prompts = {r["prompt_id"]: r for r in prompts_table.select(["prompt_id", "prompt", "reference"]).to_pylist()}
    resp = responses_table.select(["prompt_id", "sample_idx", "policy", "completion"]).to_pylist()
    missing = sorted({r["prompt_id"] for r in resp} - prompts.keys())
    if missing:
        raise ValueError(f"{len(missing)} response prompt_id(s) not in the prompts table, e.g. {missing[:3]}")
    cols: dict[str, list[float]] = {}
    for name in rewards:
        kw = dict(params.get(name, {}))
        if name == "math_correct":
            pairs = [(r["completion"], prompts[r["prompt_id"]]["reference"]) for r in resp]
            cols[name] = math_verify_batch(pairs, workers=workers, timeout_s=float(kw.get("timeout_s", 5.0)))
        else:
            fn = REGISTRY[name].fn
            cols[name] = [
                float(fn(r["completion"], reference=prompts[r["prompt_id"]]["reference"],
                         prompt=prompts[r["prompt_id"]]["prompt"], **kw))
                for r in resp
            ]
    total = [sum(w * cols[n][i] for n, w in rewards.items()) for i in range(len(resp))]
    data = {k: [r[k] for r in resp] for k in ("prompt_id", "sample_idx", "policy")}
    data["reward"] = total
    data.update(cols)
    return pa.table(data, schema=rewards_schema(list(rewards)))


def main(argv: list[str] | None = None) -> int:
    """CLI: score a responses parquet against its prompts and write the rewards parquet."""
    from rlmeta.io import read_table, write_table

    p = argparse.ArgumentParser(prog="score.py", description="Score responses with weighted rewards.")
    p.add_argument("--prompts", required=True, help="prompts parquet")
    p.add_argument("--responses", required=True, help="responses parquet")
    p.add_argument("--out", required=True, help="output rewards parquet")
    p.add_argument("--rewards-json", required=True, help='reward name -> weight, e.g. \'{"sections": 0.5}\'')
    p.add_argument("--params-json", default="{}", help="reward name -> keyword arguments (default {})")
    p.add_argument("--workers", type=int, default=2, help="math-verify worker processes (default 2)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    rewards, params = json.loads(a.rewards_json), json.loads(a.params_json)
    t0 = time.perf_counter()
    table = score_responses(read_table(a.prompts, PROMPTS), read_table(a.responses, RESPONSES), rewards, params, a.workers)
    write_table(a.out, table, rewards_schema(list(rewards)))
    means = {c: round(sum(v := table.column(c).to_pylist()) / max(len(v), 1), 4) for c in ["reward", *rewards]}
    log.info("scored %d responses -> %s in %.2fs; means %s", table.num_rows, a.out, time.perf_counter() - t0, means)
    return 0
