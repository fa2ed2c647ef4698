"""GSM8K -> ``<out_dir>/{train,test}.parquet`` (schema PROBLEMS, subject/level null).

The source is a hub id (``datasets.load_dataset(id, "main")``) or a local folder with
``train``/``test`` ``.jsonl`` or ``.parquet`` files (fields ``question``, ``answer``).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from rlmeta.answers import gsm8k_final_answer, to_float
from rlmeta.data.common import is_local, iter_records, problems_command, split_files
from rlmeta.errors import UserError
from rlmeta.io import write_table
from rlmeta.tables import PROBLEMS

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

Record = tuple[str, int, "dict | None", "str | None"]  # origin, row, record, read error


def read_split(source: str, split: str) -> Iterator[Record]:
    """Raw rows of one split as ``(origin, row, record, error)``."""
    if is_local(source):
        for path, row, rec, err in iter_records(split_files(source, split)):
            yield str(path), row, rec, err
        return
    from datasets import load_dataset  # hub path: needs network or a warm HF cache

    for row, rec in enumerate(load_dataset(source, "main", split=split)):
        yield f"{source}[{split}]", row, rec, None


def parse_rows(records: Iterable[Record], split: str) -> tuple[list[dict], int]:
    """PROBLEMS rows and the number of rows dropped (each drop logged with file and row)."""
    rows, dropped = [], 0
    for origin, row, rec, err in records:
        question = (rec or {}).get("question")
        solution = (rec or {}).get("answer")
        answer = gsm8k_final_answer(solution) if isinstance(solution, str) else None
        if err is None and not (isinstance(question, str) and question.strip()):
            err = "missing question"
        elif err is None and answer is None:
            err = "no '####' final answer"
        elif err is None and to_float(answer) is None:
            err = f"final answer {answer!r} is not a number"
        if err:
            log.warning("%s: row %d dropped: %s", origin, row, err)
            dropped += 1
            continue
        rows.append(dict(problem_id=f"gsm8k/{split}/{row}", source="gsm8k", split=split, subject=None,
                         level=None, question=question, solution=solution, answer=answer))
    return rows, dropped


def prepare_gsm8k(source: str, out_dir: str | Path, max_train: int | None = None,
                  max_test: int | None = None) -> dict[str, int]:
    """Write ``train.parquet`` and ``test.parquet``; returns split -> rows written.

    ``max_*`` keep the first N parsed rows in source order.
    """
    counts = {}
    for split, cap in zip(SPLITS, (max_train, max_test)):
        rows, dropped = parse_rows(read_split(source, split), split)
        if not rows:
            raise UserError(f"GSM8K {split} from {source}: no usable rows ({dropped} dropped; the log names each one)")
        kept = rows[:cap] if cap else rows
        write_table(Path(out_dir) / f"{split}.parquet", pa.Table.from_pylist(kept, schema=PROBLEMS), PROBLEMS)
        log.info("gsm8k %s: %d parsed, %d dropped, %d written", split, len(rows), dropped, len(kept))
        counts[split] = len(kept)
    return counts


def command(p: argparse.ArgumentParser):
    """``rlmeta prepare-gsm8k``."""
    from rlmeta.settings import GSM8KDataset

    return problems_command(p, prepare_gsm8k, GSM8KDataset, "openai/gsm8k")
