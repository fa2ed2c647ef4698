"""Sample completions for a prompts table -> a RESPONSES table.

Prompts are taken in table order (``split`` rows, the first ``max_prompts``) and generated in
batches of ``batch_size`` prompts x ``samples`` completions. Batch ``b`` is sampled with seed
``derive_seed(seed, b)`` (stored in the ``seed`` column), so one batch can be re-run alone and
the table is identical for a seed on a given backend. Rows are in prompt order, then sample_idx.
"""
from __future__ import annotations

import argparse
import logging
import sys

import pyarrow as pa
from tqdm import tqdm

from rlmeta.io import read_table, write_table
from rlmeta.policy.base import derive_seed
from rlmeta.tables import PROMPTS, RESPONSES

log = logging.getLogger(__name__)


def batch_seed(seed: int, batch_index: int) -> int:
    """Sampling seed of one rollout batch."""
    return derive_seed("rollout", seed, batch_index)


def select_prompts(prompts_table: pa.Table, split: str | None = "eval", max_prompts: int | None = None) -> list[dict]:
    """Rows of ``split`` (all rows when None) in table order, at most ``max_prompts``."""
    rows = prompts_table.select(["prompt_id", "split", "prompt"]).to_pylist()
    rows = [r for r in rows if split is None or r["split"] == split]
    return rows[:max_prompts] if max_prompts else rows


def generate_responses(policy, prompts_table: pa.Table, split: str | None = "eval", samples: int = 4,
                       temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                       batch_size: int = 8, policy_name: str = "base", max_prompts: int | None = None) -> pa.Table:
    """``samples`` completions for each selected prompt as a RESPONSES table."""
    rows = select_prompts(prompts_table, split, max_prompts)
    records = []
    with tqdm(total=len(rows), desc=f"generate {policy_name}", unit="prompt", file=sys.stderr) as bar:
        for b, start in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[start:start + batch_size]
            s = batch_seed(seed, b)
            gens = policy.generate([r["prompt"] for r in chunk], samples, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=s)
            for g in sorted(gens, key=lambda g: (g.prompt_index, g.sample_idx)):
                records.append({
                    "prompt_id": chunk[g.prompt_index]["prompt_id"], "sample_idx": g.sample_idx,
                    "policy": policy_name, "completion": g.text, "n_tokens": len(g.token_ids),
                    "finish_reason": g.finish_reason, "temperature": temperature, "seed": s,
                })
            bar.update(len(chunk))
    return pa.Table.from_pylist(records, schema=RESPONSES)


def main(argv: list[str] | None = None) -> int:
    """CLI of ``scripts/generate.py``."""
    ap = argparse.ArgumentParser(description="Sample completions for the prompts of one split and write a "
                                             "responses parquet (schema rlmeta.tables.RESPONSES).")
    ap.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    ap.add_argument("--backend", required=True, choices=["mlx", "torch"])
    ap.add_argument("--prompts", required=True, help="prompts parquet (schema PROMPTS)")
    ap.add_argument("--split", default="eval", help="prompt split to use (default: eval)")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    ap.add_argument("--policy-name", default="base", help="value of the policy column (base | trained)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", required=True, help="output parquet (written atomically)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from rlmeta.policy import load_policy

    prompts = read_table(args.prompts, PROMPTS)
    policy = load_policy(args.model, args.backend, dtype=args.dtype)
    table = generate_responses(policy, prompts, args.split, args.samples, args.temperature, args.top_p,
                               args.max_new_tokens, args.seed, args.batch_size, args.policy_name, args.max_prompts)
    write_table(args.out, table, RESPONSES)
    log.info("wrote %d responses for %d prompts to %s", table.num_rows, table.num_rows // max(args.samples, 1),
             args.out)
    return 0
