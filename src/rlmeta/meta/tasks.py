"""MATH subjects as meta-learning tasks: loading, SFT encoding and seeded, rank-independent sampling.

Every draw comes from ``numpy.random.default_rng([seed, step, ...])``, so all ranks
draw the same meta-batch and batches whatever the world size, and a resumed run
draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from rlmeta.io import read_table
from rlmeta.tables import PROBLEMS

IM_END = "<|im_end|>"
SPLIT_CODES = {"support": 0, "query": 1, "heldout": 2}


def messages(row: dict) -> list[dict]:
    """The ``math_boxed`` chat messages of a problem row."""
    from rlmeta.prompts import math_boxed

    return math_boxed(row)


def load_tasks(tasks_dir: str | Path, subjects: list[str], split: str) -> dict[str, list[dict]]:
    """``<tasks_dir>/<subject>/<split>.parquet`` rows per subject (PROBLEMS schema)."""
    out = {}
    for s in subjects:
        rows = read_table(Path(tasks_dir) / s / f"{split}.parquet", PROBLEMS).to_pylist()
        if not rows:
            raise ValueError(f"{tasks_dir}/{s}/{split}.parquet has no rows")
        out[s] = rows
    return out


def encode(tokenizer, row: dict, max_seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: chat prompt (masked with -100) + solution + ``<|im_end|>``, cut to
    ``max_seq_len`` tokens (the solution's tail is dropped first)."""
    prompt = tokenizer.apply_chat_template(messages(row), tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(row["solution"] + IM_END, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_seq_len]
    labels = ([-100] * len(p) + c)[:max_seq_len]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (int64 tensors).

    An empty list gives one pad token with no label (a rank with no rows still runs
    the forward that FSDP's collectives need)."""
    import torch

    examples = examples or [([pad_id], [-100])]
    n = max(len(ids) for ids, _ in examples)
    ids = [x + [pad_id] * (n - len(x)) for x, _ in examples]
    att = [[1] * len(x) + [0] * (n - len(x)) for x, _ in examples]
    lab = [y + [-100] * (n - len(y)) for _, y in examples]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in
            (("input_ids", ids), ("attention_mask", att), ("labels", lab))}


def balanced_split(lengths: list[int], parts: int) -> list[list[int]]:
    """Positions of a batch's rows (``lengths``: tokens per row) for each of ``parts`` shard ranks, so that
    the slowest rank's padded batch (rows x its longest row) is as small as it can be.

    Every rank pads to its own longest row, and under FSDP the slowest rank sets the pace of every
    collective: a round-robin split leaves the rank holding the longest row with as many rows as the
    others. As verl's sequence-length balancing of data-parallel batches (``balance_batch``), this gives
    the longest rows fewer companions: contiguous runs of the rows sorted by length (longest first, ties
    by position), with the least worst-run cost found by bisection over the cost (a run's cost is its size
    times its first row, so filling each run greedily up to a bound is optimal for that bound: O(n log n)).
    Each rank gets at least one row when there are enough; the loss is a token mean over the whole batch,
    so an uneven split changes nothing in the maths. A pure function of ``lengths``: every rank computes
    the same."""
    if parts <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    sl = [max(1, lengths[i]) for i in order]

    def runs(bound: int) -> list[int]:  # start of each run when every run is filled up to ``bound``
        starts, i = [], 0
        while i < len(sl):
            starts.append(i)
            i += max(1, bound // sl[i])
        return starts

    lo, hi = (sl[0], len(sl) * sl[0]) if sl else (0, 0)
    while lo < hi:  # the least bound that needs at most ``parts`` runs
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(runs(mid)) <= parts else (mid + 1, hi)
    cuts = runs(lo) + [len(sl)]
    groups = [order[a:b] for a, b in zip(cuts, cuts[1:])]
    while len(groups) < min(parts, len(sl)):  # an idle rank while another has 2+ rows: split the largest run
        k = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
        groups[k:k + 1] = [groups[k][:-1], groups[k][-1:]]
    return groups + [[] for _ in range(parts - len(groups))]


def _key(task: str) -> int:
    return zlib.crc32(task.encode("utf-8"))


class TaskSampler:
    """Seeded meta-batches of tasks and row batches; a pure function of (seed, step, slot)."""

    def __init__(self, tasks: list[str], seed: int):
        self.tasks, self.seed = list(tasks), int(seed)

    def meta_batch(self, step: int, size: int) -> list[str]:
        """``size`` tasks: a fresh permutation per pass over the tasks (no repeats when size <= tasks)."""
        rng = np.random.default_rng([self.seed, step, 0])
        order: list[str] = []
        while len(order) < size:
            order += [self.tasks[i] for i in rng.permutation(len(self.tasks))]
        return order[:size]

    def rows(self, step: int, slot: int, task: str, split: str, n_rows: int, size: int) -> list[int]:
        """Row indices of one batch (without replacement when ``size <= n_rows``)."""
        rng = np.random.default_rng([self.seed, step, 1 + slot, _key(task), SPLIT_CODES.get(split, 9)])
        return [int(i) for i in rng.choice(n_rows, size=size, replace=size > n_rows)]


EPISODE_STREAMS = {"validation": 1, "eval": 2}


def episode(seed: int, stream: str, subject: str, index: int, n_rows: int, n_support: int,
            n_query: int) -> tuple[list[int], list[int]]:
    """Row indices (support, query) of one adaptation episode: disjoint, a seeded function of
    ``(seed, stream, subject, index)``; the query takes at most the rows the support set leaves."""
    if n_rows < n_support + 1:
        raise ValueError(f"{subject}: an episode needs more than {n_support} rows (support_batch), got {n_rows}")
    rng = np.random.default_rng([seed, 100 + EPISODE_STREAMS[stream], _key(subject), index])
    perm = [int(i) for i in rng.permutation(n_rows)]
    return perm[:n_support], perm[n_support:n_support + n_query]
