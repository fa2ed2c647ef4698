"""Run tracking shared by the training backends: the train_metrics table, W&B runs, NaN guards.

Backend-neutral: no torch, TRL or MLX import here.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from rlmeta.io import write_table
from rlmeta.tables import train_metrics_schema

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class NonFiniteMetricError(FloatingPointError):
    """A logged training metric is NaN or infinite."""


METRICS_FILE = "train_metrics.parquet"
"""The rows so far, inside every resumable checkpoint: a resumed run rebuilds the whole table."""


class MetricsTable:
    """The rows of ``train_metrics`` (one per step), written under the final name once, when training ends.

    Columns follow ``train_metrics_schema(extra_columns)``; a key missing from a row is null, a key
    outside the schema is an error. Each checkpoint carries a copy (``METRICS_FILE``), so a run that
    resumes from it ends with every step's row, not only those it trained itself.
    """

    def __init__(self, extra_columns: list[str] = ()):
        self.schema = train_metrics_schema(list(extra_columns))
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        """Append one step's metrics (``step`` required)."""
        unknown = sorted(set(row) - set(self.schema.names))
        if unknown:
            raise KeyError(f"metrics {unknown} are not train_metrics columns {self.schema.names}")
        if row.get("step") is None:
            raise KeyError("a train_metrics row needs 'step'")
        self.rows.append({n: _plain(row.get(n)) for n in self.schema.names})

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=self.schema)

    def write(self, path: str | os.PathLike) -> None:
        """Write every row so far to ``path`` (parquet, atomically)."""
        write_table(path, self.table())

    def restore(self, checkpoint: str | os.PathLike, up_to_step: int) -> None:
        """Take the rows up to ``up_to_step`` from a checkpoint's copy of the table."""
        import pyarrow.parquet as pq

        old = pq.read_table(Path(checkpoint) / METRICS_FILE).to_pylist()
        self.rows = [{n: r.get(n) for n in self.schema.names} for r in old if r["step"] <= up_to_step]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def check_finite(metrics: dict[str, Any], step: int, last_checkpoint: str | os.PathLike | None = None) -> None:
    """Raise ``NonFiniteMetricError`` when any numeric value of ``metrics`` is NaN or infinite.

    The message names the metrics, the step and the last good checkpoint to resume from, e.g.
    ``non-finite loss at step 12: loss=nan, grad_norm=inf; last good checkpoint: out/checkpoint-10``.
    """
    bad = {k: v for k, v in metrics.items()
           if isinstance(_plain(v), (int, float)) and not math.isfinite(float(_plain(v)))}
    if bad:
        names = ", ".join(bad)
        values = ", ".join(f"{k}={_plain(v)}" for k, v in bad.items())
        raise NonFiniteMetricError(f"non-finite {names} at step {step}: {values}; "
                                   f"last good checkpoint: {last_checkpoint or 'none (start over)'}")


def scrub_secrets(obj: Any) -> Any:
    """Copy of a (nested) config without keys containing KEY, TOKEN, SECRET or PASSWORD."""
    if isinstance(obj, dict):
        return {k: scrub_secrets(v) for k, v in obj.items()
                if not any(m in str(k).upper() for m in SECRET_MARKERS)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v) for v in obj)
    return obj


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (str) or unset (None) environment variables; restore them on exit."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def wandb_run(settings, name: str | None = None, dir: str | os.PathLike | None = None, config: dict | None = None):
    """A W&B run for the duration of the block; yields the run (a no-op run when ``disabled``).

    ``settings``: a ``WandbSettings``. ``offline`` (default) needs no account: the run lands in
    ``<dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it later. ``online`` reads the key from
    WANDB_API_KEY (or ``wandb login``); in the other modes WANDB_API_KEY is hidden from wandb for the
    run. WANDB_DIR and WANDB_MODE are set while the block runs (so TRL/transformers' WandbCallback
    logs into this run) and restored after. ``config`` is logged without keys that look like
    secrets (``scrub_secrets``). The run finishes with exit code 1 when the block raises.
    """
    import wandb

    mode = settings.mode
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    env = {"WANDB_MODE": mode, "WANDB_DIR": str(dir) if dir is not None else os.environ.get("WANDB_DIR"),
           "WANDB_PROJECT": settings.project}
    if mode != "online":
        env["WANDB_API_KEY"] = None
    with _env(**env):
        run = wandb.init(mode=mode, project=settings.project, entity=settings.entity, name=name,
                         dir=str(dir) if dir is not None else None, config=scrub_secrets(dict(config or {})))
        try:
            yield run
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish()
