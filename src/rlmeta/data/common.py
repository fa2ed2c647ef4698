"""Helpers shared by the data steps: logging, source detection, local table reading."""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from rlmeta.errors import UserError

log = logging.getLogger(__name__)


def is_local(source: str) -> bool:
    """True when ``source`` names an existing local folder; False for a hub id.

    Raises ``UserError`` for something that is neither (``rlmeta.models.hub.classify_source``).
    """
    from rlmeta.models.hub import classify_source

    return classify_source(source, "source") == "local"


def problems_command(p: argparse.ArgumentParser, prepare, model, example_hub: str):
    """The command line shared by ``prepare-gsm8k`` and ``prepare-math``: source, out-dir, caps."""
    from rlmeta.cli import help_of

    p.add_argument("--source", required=True,
                   help=f"hub id ({example_hub}) or a folder with train/test .jsonl/.parquet")
    p.add_argument("--out-dir", required=True, help="output folder (gets train.parquet, test.parquet)")
    p.add_argument("--max-train", type=int, default=None, help=help_of(model, "max_train"))
    p.add_argument("--max-test", type=int, default=None, help=help_of(model, "max_test"))

    def run(a):
        start = time.monotonic()
        counts = prepare(a.source, a.out_dir, a.max_train, a.max_test)
        log.info("%s done in %.1fs: %s", prepare.__name__, time.monotonic() - start, counts)
    return run


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The ``.jsonl``/``.parquet`` files holding ``split`` in ``folder``.

    Accepts ``<split>.jsonl``, ``<split>.parquet`` and hub-style shards
    ``**/<split>-*.parquet|jsonl`` (sorted by name).
    """
    folder = Path(folder)
    for pattern in (f"{split}.jsonl", f"{split}.parquet", f"**/{split}-*.parquet", f"**/{split}-*.jsonl"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise UserError(f"{folder}: no {split}.jsonl or {split}.parquet (or {split}-*.parquet shards) in it")


def iter_records(paths: list[Path]) -> Iterator[tuple[Path, int, dict | None, str | None]]:
    """Yield ``(file, row, record, error)`` over the files; ``row`` counts across files.

    A JSONL line that is not a JSON object yields ``record=None`` with the error,
    so callers can report it instead of dropping it silently.
    """
    row = 0
    for path in paths:
        if path.suffix == ".parquet":
            for rec in pq.read_table(path).to_pylist():
                yield path, row, rec, None
                row += 1
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    err = None if isinstance(rec, dict) else "not a JSON object"
                except json.JSONDecodeError as exc:
                    rec, err = None, f"invalid JSON ({exc.msg})"
                yield path, row, (rec if err is None else None), err
                row += 1
