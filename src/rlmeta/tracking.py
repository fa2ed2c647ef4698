"""Run tracking shared by the training backends: the train_metrics table, W&B runs, the divergence guard.

Backend-neutral: no torch, TRL or MLX import here.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from rlmeta.errors import UserError
from rlmeta.io import write_table
from rlmeta.tables import train_metrics_schema

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


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


class DivergenceError(UserError, FloatingPointError):
    """Training went wrong (a non-finite value, or a divergence condition held for ``patience`` steps); the
    message names the step, the condition and the last checkpoint written before it."""


class NonFiniteMetricError(DivergenceError):
    """A logged training metric, or a weight, is NaN or infinite."""


@dataclass
class _Streak:
    first: int  # the step at which the condition started to hold
    length: int


class DivergenceGuard:
    """Stops a run that has diverged, on every trainer (``settings.GuardSettings``).

    ``check(step, row, param_norm, params_finite)`` after every step raises ``NonFiniteMetricError`` at
    once for a NaN/inf metric or weight, and ``DivergenceError`` when one of these holds for
    ``patience`` consecutive steps:

    - ``zero_grad``: the gradient norm is at or below ``zero_grad_norm`` although the rewards still
      differ within some group (``zero_std_frac < 1``: there was a learning signal);
    - ``param_norm``: the norm of all weights is above ``param_norm_ratio`` times its value at the start;
    - ``reward_floor``: the mean rollout reward sits at its lowest possible value (``reward_floor``),
      having been above it before (a collapse, not a task that is too hard from the start).

    The error names the last checkpoint written before the first step at which any active condition
    started to hold (``record_checkpoint``), skipping any whose weights were not finite: nothing
    written after things started to go wrong is called good.
    """

    KEYS = {"zero_grad": "zero_grad_norm", "param_norm": "param_norm_ratio", "reward_floor": "reward_floor"}
    """Condition -> the settings key that controls it (named in the error)."""

    def __init__(self, settings, reward_floor: float | None = None, where: str = "train.guard",
                 verify=None):
        self.s, self.reward_floor, self.where = settings, reward_floor, where
        self.verify = verify  # path -> bool | None: re-checks a checkpoint's weights on disk before naming it
        self.start_norm: float | None = None
        self.streaks: dict[str, _Streak] = {}
        self.seen_above_floor = False
        self.checkpoints: list[tuple[int, str, bool]] = []  # (step, path, weights finite)

    def begin(self, param_norm: float | None) -> None:
        """The weights' norm before the first update: the baseline of ``param_norm_ratio`` (a run that blows up
        in its first update then trips too). A resumed run keeps the baseline it restored."""
        if self.start_norm is None and param_norm is not None and math.isfinite(param_norm):
            self.start_norm = param_norm

    def since(self) -> int | None:
        """The first step of the conditions that hold now (None when none does)."""
        return min((s.first for s in self.streaks.values()), default=None)

    def protected(self) -> list[str]:
        """Checkpoints that pruning must keep: the one the error would name if a condition that holds now
        trips (it was written before the condition started, so it may be older than the kept ones)."""
        first = self.since()
        good = self.good_checkpoint(first) if first is not None else None
        return [good] if good else []

    def record_checkpoint(self, step: int, path, weights_finite: bool = True) -> None:
        self.checkpoints.append((int(step), str(path), bool(weights_finite)))

    def restore(self, state: dict) -> None:
        """Continue from ``state()`` of a resumed run (its start norm, streaks and checkpoints)."""
        self.start_norm = state.get("start_norm")
        self.seen_above_floor = bool(state.get("seen_above_floor", False))
        self.streaks = {k: _Streak(**v) for k, v in state.get("streaks", {}).items()}
        self.checkpoints = [tuple(c) for c in state.get("checkpoints", [])]

    def state(self) -> dict:
        return {"start_norm": self.start_norm, "seen_above_floor": self.seen_above_floor,
                "streaks": {k: vars(v) for k, v in self.streaks.items()},
                "checkpoints": [list(c) for c in self.checkpoints]}

    def good_checkpoint(self, before_step: int) -> str | None:
        """The newest checkpoint written before ``before_step`` whose weights were finite (checked again on disk)."""
        for step, path, finite in reversed(self.checkpoints):
            if step < before_step and finite and Path(path).exists() \
                    and (self.verify is None or self.verify(path) is not False):
                return path
        return None

    def _held(self, row: dict, param_norm: float | None) -> dict[str, str]:
        s, held = self.s, {}
        grad, spread = row.get("grad_norm"), row.get("zero_std_frac")
        if s.zero_grad_norm is not None and grad is not None and grad <= s.zero_grad_norm \
                and (spread is None or spread < 1.0):
            held["zero_grad"] = f"the gradient norm stayed at {grad:.3g} (<= {s.zero_grad_norm:g})" + (
                " while the rewards still differed within groups" if spread is not None else "")
        if s.param_norm_ratio is not None and param_norm is not None and self.start_norm:
            ratio = param_norm / self.start_norm
            if ratio > s.param_norm_ratio:
                held["param_norm"] = (f"the weights' norm grew to {param_norm:.4g}, {ratio:.3g}x its start "
                                      f"{self.start_norm:.4g} (limit {s.param_norm_ratio:g}x)")
        reward = row.get("reward_mean")
        if getattr(s, "reward_floor", False) and self.reward_floor is not None and reward is not None:
            if reward <= self.reward_floor + 1e-9:
                if self.seen_above_floor:
                    held["reward_floor"] = (f"the mean rollout reward fell to its floor {self.reward_floor:g} "
                                            "after having been above it")
            else:
                self.seen_above_floor = True
        return held

    def check(self, step: int, row: dict, param_norm: float | None = None, params_finite: bool = True) -> None:
        """Raise when the run has diverged at ``step`` (see the class docstring); else record the step."""
        bad = {k: v for k, v in row.items()
               if k != "step" and isinstance(_plain(v), (int, float)) and not math.isfinite(float(_plain(v)))}
        if param_norm is not None and not math.isfinite(param_norm):
            bad["param_norm"] = param_norm
        if bad or not params_finite:
            first = min(self.since() or step, step)
            what = ", ".join(f"{k}={_plain(v)}" for k, v in bad.items()) or "weights"
            raise NonFiniteMetricError(
                f"non-finite {', '.join(bad) or 'weights'} at step {step}: {what}; last good checkpoint: "
                f"{self.good_checkpoint(first) or 'none (start over)'}")
        if self.start_norm is None and param_norm is not None:
            self.start_norm = param_norm
        held = self._held(row, param_norm)
        self.streaks = {k: _Streak(self.streaks[k].first if k in self.streaks else step,
                                   self.streaks[k].length + 1 if k in self.streaks else 1) for k in held}
        tripped = [k for k in held if self.streaks[k].length >= self.s.patience]
        if tripped:
            k = tripped[0]
            first = self.since()
            raise DivergenceError(
                f"diverged at step {step}: {held[k]} for {self.streaks[k].length} steps (since step "
                f"{self.streaks[k].first}; {self.where}.{self.KEYS[k]}); last good checkpoint: "
                f"{self.good_checkpoint(first) or 'none (start over)'}")


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


def _active(run) -> bool:
    return run is not None and not getattr(run, "disabled", False)


def log_eval(run, row: dict, step: int, step_key: str | None = None) -> None:
    """An evaluation row (``EvalCurve``) into a W&B run as ``eval/<column>`` at ``step`` (``step_key``: log the
    step as that metric instead of W&B's own step, as transformers' ``train/global_step``)."""
    if not _active(run):
        return
    data = {f"eval/{k}": v for k, v in row.items() if k != "step" and v is not None}
    if step_key is None:
        run.log(data, step=int(step))
    else:
        run.log({**data, step_key: int(step)})


def log_table(run, key: str, table: pa.Table, step: int, step_key: str | None = None) -> None:
    """A pyarrow table into a W&B run as a ``wandb.Table`` under ``key`` at ``step`` (see ``log_eval``)."""
    if not _active(run) or table.num_rows == 0:
        return
    import wandb

    data = {key: wandb.Table(dataframe=table.to_pandas())}
    if step_key is None:
        run.log(data, step=int(step))
    else:
        run.log({**data, step_key: int(step)})
