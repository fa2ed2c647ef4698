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
    the longest rows fewer companions: an exact split into contiguous runs of the rows sorted by length
    (longest first, ties by position), by dynamic programming over the split points. Each rank gets at
    least one row when there are enough; the loss is a token mean over the whole batch, so an uneven
    split changes nothing in the maths. A pure function of ``lengths``: every rank computes the same."""
    if parts <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    sl = [lengths[i] for i in order]
    n = len(sl)
    runs = min(parts, n)
    inf = float("inf")
    # best[p][j]: the least worst-rank cost of the first j sorted rows over p ranks; cut[p][j]: where run p starts
    best = [[inf] * (n + 1) for _ in range(runs + 1)]
    cut = [[0] * (n + 1) for _ in range(runs + 1)]
    best[0][0] = 0
    for p in range(1, runs + 1):
        for j in range(p, n + 1):
            for i in range(p - 1, j):
                c = max(best[p - 1][i], (j - i) * sl[i])
                if c < best[p][j]:
                    best[p][j], cut[p][j] = c, i
    groups, j = [], n
    for p in range(runs, 0, -1):
        groups.append(order[cut[p][j]:j])
        j = cut[p][j]
    groups.reverse()
    return groups + [[] for _ in range(parts - runs)]


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
