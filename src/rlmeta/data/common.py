"""Helpers shared by the data steps: logging, source detection, local table reading."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with timestamps (idempotent for repeated ``main()`` calls)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def is_local(source: str) -> bool:
    """True when ``source`` names an existing local folder; False for a hub id.

    Raises FileNotFoundError for something that is neither.
    """
    if Path(source).exists():
        return True
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return False
    raise FileNotFoundError(f"data source {source!r} is neither an existing folder nor a hub id (owner/name)")


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
    raise FileNotFoundError(f"no {split}.jsonl or {split}.parquet (or {split}-*.parquet shards) in {folder}")


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
