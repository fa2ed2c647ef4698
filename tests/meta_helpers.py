"""Test helpers for the FOMAML tests: a tiny Qwen3 checkpoint and tiny MATH task tables."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from rlmeta.io import write_table
from rlmeta.tables import PROBLEMS

SUBJECTS = ["algebra", "geometry", "number_theory"]
BUILD = {"tokenizer": "bpe", "vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}


def _problem(subject: str, i: int, split: str) -> dict:
    a, b = i + 2, (i * 3) % 7 + 1
    op, ans = {"algebra": ("+", a + b), "geometry": ("*", a * b), "number_theory": ("-", a - b)}[subject]
    return dict(problem_id=f"{subject}/{split}/{i}", source="math", split=split, subject=subject, level=1,
                question=f"What is {a} {op} {b}?", solution=f"We get {a} {op} {b} = \\boxed{{{ans}}}.",
                answer=str(ans))


def make_tasks(root: Path, subjects=SUBJECTS, sizes=(6, 6, 6)) -> Path:
    """Write ``<root>/<subject>/{support,query,heldout}.parquet`` of one-line arithmetic problems."""
    for s_i, subject in enumerate(subjects):
        start = 10 * s_i
        for split, n in zip(("support", "query", "heldout"), sizes):
            rows = [_problem(subject, start + j, split) for j in range(n)]
            start += n
            write_table(root / subject / f"{split}.parquet", pa.Table.from_pylist(rows, schema=PROBLEMS), PROBLEMS)
    return root


def tiny_model(out: Path, seed: int = 0) -> Path:
    """A tiny Qwen3 (hidden 64, 2 layers, 300-token BPE) from ``build_tiny_model`` on the problems' text."""
    from rlmeta.models.build import build_tiny_model

    corpus = out.parent / f"{out.name}_corpus.jsonl"
    with open(corpus, "w") as fh:
        for s in SUBJECTS:
            for i in range(40):
                r = _problem(s, i, "x")
                fh.write(json.dumps({"problem": r["question"], "solution": r["solution"]}) + "\n")
    return build_tiny_model(out, BUILD, [corpus], seed)
