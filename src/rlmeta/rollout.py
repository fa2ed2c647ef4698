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
from rlmeta.policy.base import derive_seed, encode_prompts
from rlmeta.settings import SamplingSettings, shaping_of
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


def generate_responses(policy, prompts_table: pa.Table, sampling: SamplingSettings,
                       policy_name: str = "base") -> pa.Table:
    """``sampling.samples`` completions for each selected prompt as a RESPONSES table."""
    rows = select_prompts(prompts_table, sampling.split, sampling.max_prompts)
    records = []
    with tqdm(total=len(rows), desc=f"generate {policy_name}", unit="prompt", file=sys.stderr) as bar:
        for b, start in enumerate(range(0, len(rows), sampling.batch_size)):
            chunk = rows[start:start + sampling.batch_size]
            s = batch_seed(sampling.seed, b)
            # the chat template kwargs are the evaluation's (null there: training's; Experiment.sampling)
            ids = encode_prompts(policy.tokenizer, [r["prompt"] for r in chunk], sampling.chat_template_kwargs)
            gens = policy.generate(ids, sampling.samples, temperature=sampling.temperature,
                                   **shaping_of(sampling), max_new_tokens=sampling.max_new_tokens, seed=s)
            for g in sorted(gens, key=lambda g: (g.prompt_index, g.sample_idx)):
                records.append({
                    "prompt_id": chunk[g.prompt_index]["prompt_id"], "sample_idx": g.sample_idx,
                    "policy": policy_name, "completion": g.text, "n_tokens": len(g.token_ids),
                    "finish_reason": g.finish_reason, "temperature": sampling.temperature, "seed": s,
                })
            bar.update(len(chunk))
    return pa.Table.from_pylist(records, schema=RESPONSES)


def command(p: argparse.ArgumentParser):
    """``rlmeta generate``: completions for the prompts of one split -> a responses parquet."""
    from rlmeta.cli import add_settings, existing_file, model_ref

    p.add_argument("--model", required=True, type=model_ref, help="checkpoint folder (or hub id)")
    p.add_argument("--backend", required=True, choices=["mlx", "torch"])
    p.add_argument("--prompts", required=True, type=existing_file, help="prompts parquet (schema PROMPTS)")
    add_settings(p, "sampling", SamplingSettings, "how to sample (the experiment's eval block, resolved)")
    p.add_argument("--policy-name", default="base", help="value of the policy column (base | trained)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="output parquet (written atomically)")

    def run(a):
        from rlmeta.policy import load_policy

        policy = load_policy(a.model, a.backend, dtype=a.dtype)
        table = generate_responses(policy, read_table(a.prompts, PROMPTS), a.sampling, a.policy_name)
        write_table(a.out, table, RESPONSES)
        log.info("wrote %d responses for %d prompts to %s", table.num_rows, table.num_rows // a.sampling.samples, a.out)
    return run
