"""MATH -> ``{train,test}.parquet`` (PROBLEMS), then per-subject meta-learning tasks.

The source is a hub id (``EleutherAI/hendrycks_math``, one config per subject, or a
single-config copy such as ``DigitalLearningGmbH/MATH-lighteval``) or a local folder
with ``train``/``test`` ``.jsonl``/``.parquet`` in the MATH release fields
(problem, level "Level 3", type "Algebra", solution, optional unique_id).
"""
from __future__ import annotations

import argparse
import logging
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlmeta.answers import last_boxed
from rlmeta.data.common import is_local, iter_records, problems_command, split_files
from rlmeta.errors import UserError
from rlmeta.io import atomic_dir, read_table, write_table
from rlmeta.settings import MATH_TYPES as MATH_SUBJECTS
from rlmeta.tables import PROBLEMS

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
SLUGS = list(MATH_SUBJECTS.values())
TASK_SPLITS = ("support", "query", "heldout")


def read_split(source: str, split: str) -> Iterator[tuple[str, int, dict | None, str | None]]:
    """Raw rows of one split as ``(origin, row, record, error)``."""
    if is_local(source):
        for path, row, rec, err in iter_records(split_files(source, split)):
            yield str(path), row, rec, err
        return
    from datasets import load_dataset  # hub path: needs network or a warm HF cache

    if "hendrycks_math" in source.lower():  # one config per subject
        parts = [(f"{source}/{slug}[{split}]", load_dataset(source, slug, split=split)) for slug in SLUGS]
    else:
        parts = [(f"{source}[{split}]", load_dataset(source, split=split))]
    for origin, ds in parts:
        for row, rec in enumerate(ds):
            yield origin, row, rec, None


def parse_level(level: object) -> int | None:
    """``"Level 3"`` or ``3`` -> 3; ``"Level ?"`` and anything else -> None."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(level or ""))
    return int(m.group(1)) if m else None


def parse_rows(records: Iterable[tuple], split: str) -> tuple[list[dict], int]:
    """PROBLEMS rows and the number dropped (each drop logged with origin and row)."""
    rows, dropped, per_subject = [], 0, {s: 0 for s in SLUGS}
    for origin, row, rec, err in records:
        rec = rec or {}
        kind = rec.get("type") or rec.get("subject")
        subject = MATH_SUBJECTS.get(kind, kind if kind in SLUGS else None)
        solution = rec.get("solution")
        answer = last_boxed(solution) if isinstance(solution, str) else None
        if err is None and not (isinstance(rec.get("problem"), str) and rec["problem"].strip()):
            err = "missing problem"
        elif err is None and subject is None:
            err = f"unknown subject type {kind!r}"
        elif err is None and not answer:
            err = "no \\boxed{} answer in the solution"
        if err:
            log.warning("%s: row %d dropped: %s", origin, row, err)
            dropped += 1
            continue
        pid = rec.get("unique_id") or f"math/{split}/{subject}/{per_subject[subject]}"
        per_subject[subject] += 1
        rows.append(dict(problem_id=pid, source="math", split=split, subject=subject,
                         level=parse_level(rec.get("level")), question=rec["problem"],
                         solution=solution, answer=answer))
    return rows, dropped


def balanced_head(rows: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` rows taken round-robin over subjects, returned in source order.

    Plain "first N rows" of a source sorted by subject would keep one subject only.
    """
    if not n or n >= len(rows):
        return rows
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_subject.setdefault(r["subject"], []).append(i)
    queues = [by_subject[s] for s in SLUGS if s in by_subject]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        chosen += [q[depth] for q in queues if depth < len(q)][: n - len(chosen)]
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def prepare_math(source: str, out_dir: str | Path, max_train: int | None = None,
                 max_test: int | None = None) -> dict[str, int]:
    """Write ``train.parquet`` and ``test.parquet``; returns split -> rows written."""
    counts = {}
    for split, cap in zip(SPLITS, (max_train, max_test)):
        rows, dropped = parse_rows(read_split(source, split), split)
        if not rows:
            raise UserError(f"MATH {split} from {source}: no usable rows ({dropped} dropped; the log names each one)")
        kept = balanced_head(rows, cap)
        write_table(Path(out_dir) / f"{split}.parquet", pa.Table.from_pylist(kept, schema=PROBLEMS), PROBLEMS)
        log.info("math %s: %d parsed, %d dropped, %d written", split, len(rows), dropped, len(kept))
        counts[split] = len(kept)
    return counts


def subject_seed(seed: int, subject: str) -> int:
    """``seed`` plus a stable per-subject offset (CRC32 of the slug)."""
    return int(seed) + zlib.crc32(subject.encode("utf-8"))


def split_sizes(n: int, support_ratio: float, query_ratio: float) -> tuple[int, int, int]:
    """(support, query, heldout) sizes; support and query get at least one row each."""
    if n < 2:
        raise UserError(f"need at least 2 rows of a subject to make its support and query sets, got {n}: "
                        "use more MATH rows (max_train)")
    n_sup = min(max(1, round(n * support_ratio)), n - 1)
    n_query = min(max(1, round(n * query_ratio)), n - n_sup)
    return n_sup, n_query, n - n_sup - n_query


def split_math_tasks(train_path: str | Path, subjects: list[str], support_ratio: float, query_ratio: float,
                     seed: int, out_dir: str | Path) -> dict[str, dict[str, int]]:
    """Shuffle each subject's train rows and cut them into support/query/heldout files.

    Writes ``<out_dir>/<subject>/{support,query,heldout}.parquet`` in shuffled order
    (numpy ``default_rng(subject_seed(seed, subject))``); returns subject -> sizes.
    ``out_dir`` is replaced as a whole, only once every file is written.
    """
    if support_ratio <= 0 or query_ratio <= 0 or support_ratio + query_ratio > 1 + 1e-9:
        raise ValueError(f"need 0 < support_ratio, query_ratio and their sum <= 1; got {support_ratio}, {query_ratio}")
    unknown = [s for s in subjects if s not in SLUGS]
    if unknown:
        raise ValueError(f"unknown MATH subjects {unknown}; valid: {', '.join(SLUGS)}")
    table = read_table(train_path, PROBLEMS).select(PROBLEMS.names)
    rows = table.to_pylist()
    sizes = {}
    with atomic_dir(out_dir) as tmp_dir:
        for subject in subjects:
            sizes[subject] = _split_subject(rows, subject, support_ratio, query_ratio, seed, Path(tmp_dir) / subject)
            log.info("math task %s: %s", subject, sizes[subject])
    return sizes


def _split_subject(rows: list[dict], subject: str, support_ratio: float, query_ratio: float, seed: int,
                   out_dir: Path) -> dict[str, int]:
    """Shuffle one subject's rows and write its three files into ``out_dir``."""
    mine = [r for r in rows if r["subject"] == subject]
    if not mine:
        raise UserError(f"no train rows for subject {subject!r}: drop it from datasets.<name>.subjects or "
                        "raise max_train")
    n_sup, n_query, _ = split_sizes(len(mine), support_ratio, query_ratio)
    order = np.random.default_rng(subject_seed(seed, subject)).permutation(len(mine))
    shuffled = [mine[i] for i in order]
    parts = dict(support=shuffled[:n_sup], query=shuffled[n_sup:n_sup + n_query], heldout=shuffled[n_sup + n_query:])
    for name, part in parts.items():
        part = [dict(r, split=name) for r in part]
        write_table(out_dir / f"{name}.parquet", pa.Table.from_pylist(part, schema=PROBLEMS), PROBLEMS)
    return {k: len(v) for k, v in parts.items()}


def prepare_command(p: argparse.ArgumentParser):
    """``rlmeta prepare-math``."""
    from rlmeta.settings import MathDataset

    return problems_command(p, prepare_math, MathDataset, "EleutherAI/hendrycks_math")


def split_command(p: argparse.ArgumentParser):
    """``rlmeta split-math-tasks``: per-subject support/query/held-out parquet files."""
    from rlmeta.cli import default_of, existing_file, help_of
    from rlmeta.settings import MathDataset

    p.add_argument("--train", required=True, type=existing_file, help="MATH train.parquet (PROBLEMS schema)")
    p.add_argument("--subjects", nargs="+", default=SLUGS, choices=SLUGS, metavar="SUBJECT",
                   help=f"subject slugs (default: all): {' '.join(SLUGS)}")
    p.add_argument("--support-ratio", type=float, default=default_of(MathDataset, "support_ratio"),
                   help=help_of(MathDataset, "support_ratio"))
    p.add_argument("--query-ratio", type=float, default=default_of(MathDataset, "query_ratio"),
                   help=help_of(MathDataset, "query_ratio"))
    p.add_argument("--seed", type=int, required=True, help="base seed of the shuffles")
    p.add_argument("--out-dir", required=True, help="output folder (gets <subject>/{support,query,heldout}.parquet)")

    def run(a):
        start = time.monotonic()
        sizes = split_math_tasks(a.train, a.subjects, a.support_ratio, a.query_ratio, a.seed, a.out_dir)
        log.info("split %d subjects in %.1fs", len(sizes), time.monotonic() - start)
    return run
