"""Training-side evidence shared by both RL trainers: evaluation during training and the table of every rollout.

``EvalCurve`` evaluates the policy being trained on held-out prompts (the first ``train.eval_prompts`` of the
prompts table's eval split, one completion each at ``train.eval_temperature``, a seed fixed across
evaluations) before the first update, every ``train.eval_every`` rollout batches and after the last step, and
scores them on the one scoring path (``rlmeta.scoring.score``: the job's rewards and params, the template's task
metrics): one row per evaluation, schema ``tables.eval_curve_schema``.

``RolloutLog`` keeps every training completion (schema ``tables.rollouts_schema``) when ``train.log_rollouts``.

Both outputs are rule outputs that Snakemake deletes when a job is incomplete, so neither is written under its
final name before training ends; what survives a kill is kept elsewhere: every resumable checkpoint holds the
evaluation rows so far (``eval_curve.parquet``, small, like the metrics rows), and the rollouts go, one chunk per
checkpoint interval, to ``<out>/rollout_chunks/steps-<first:06d>-<last:06d>.parquet`` (see ``RolloutLog``).

``step`` of both tables counts the updates done before the policy produced the row, in the units of the
trainer's train_metrics rows (MLX: rollout batches; TRL: optimizer steps): evaluation step 0 is the starting
policy, and the rollouts of step ``s`` are the batch that the train_metrics row(s) after ``s`` trained on.

Backend-neutral: no torch, TRL or MLX import here.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rlmeta.io import atomic_dir, write_table
from rlmeta.settings import shaping_of
from rlmeta.tables import eval_curve_schema, rollouts_schema

log = logging.getLogger(__name__)

EVAL_FILE = "eval_curve.parquet"
"""In every resumable checkpoint: the evaluation rows so far."""
CHUNKS_DIR = "rollout_chunks"
"""Beside the checkpoints (``<out>/``): the rollouts of each checkpoint interval so far (``RolloutLog``)."""


def template_metrics(job) -> dict[str, str]:
    """The task metrics (column -> scorer) of the job's prompt template; none when it names no template."""
    if getattr(job, "template", None) is None:
        return {}
    from rlmeta.prompts import TEMPLATES

    return dict(TEMPLATES[job.template].metrics)


# -- evaluation during training ------------------------------------------------------------------------------------

class EvalCurve:
    """Evaluations of the policy being trained on held-out prompts; ``rows`` in step order.

    ``unit``: train_metrics steps per rollout batch (1 on MLX, ``updates_per_batch`` on TRL), so evaluations
    fall every ``eval_every x unit`` steps. ``last_step``: the final step (evaluated even when it is not a
    multiple). ``seed``: the training seed; the generation seed is derived from it once, for every evaluation.
    """

    def __init__(self, prompts_path: str | os.PathLike, job, seed: int, last_step: int, unit: int = 1):
        from rlmeta.policy.base import derive_seed
        from rlmeta.prompts import eval_rows

        t = job.train
        self.job, self.last_step = job, int(last_step)
        self.every = None if t.eval_every is None else t.eval_every * unit
        self.metrics = template_metrics(job)
        self.schema = eval_curve_schema(list(job.rewards), list(self.metrics))
        self.prompts = eval_rows(prompts_path, t.eval_prompts) if self.every is not None else []
        if self.every is not None and not self.prompts:
            log.warning("%s has no eval split: no evaluation during training (eval_curve has no rows)", prompts_path)
            self.every = None
        self.temperature, self.max_new_tokens = t.eval_temperature, t.max_new_tokens
        self.shaping = shaping_of(t) if t.eval_temperature > 0 else {}  # greedy: argmax (a penalty stays off too)
        self.batch = max(1, t.batch_prompts * t.group_size)  # prompts per generate call: a rollout batch's size
        self.seed = derive_seed(seed, "eval_during_training")
        self.rows: list[dict[str, Any]] = []
        self._ids: list[list[int]] | None = None

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def steps(self) -> list[int]:
        """Every step an uninterrupted run evaluates at: 0, each multiple of ``every``, and the last."""
        if self.every is None:
            return []
        return sorted({0, self.last_step, *range(self.every, self.last_step + 1, self.every)})

    def due(self, step: int) -> bool:
        """True when ``step`` is an evaluation step not evaluated yet (a resumed run has its rows already)."""
        if self.every is None or any(r["step"] == step for r in self.rows):
            return False
        return step == 0 or step % self.every == 0 or step == self.last_step

    def evaluate(self, policy, step: int) -> dict[str, Any]:
        """Generate, score and record one row for ``step`` (``policy``: an ``rlmeta.policy`` policy wrapping the
        model being trained); returns the row."""
        from rlmeta.policy.base import derive_seed
        from rlmeta.scoring import score

        t0 = time.perf_counter()
        if self._ids is None:  # the training prompts' chat template kwargs, whoever built the policy
            from rlmeta.policy.base import encode_prompts

            self._ids = encode_prompts(policy.tokenizer, [r["prompt"] for r in self.prompts],
                                       self.job.train.chat_template_kwargs)
        gens = []
        for k in range(0, len(self._ids), self.batch):
            part = policy.generate(self._ids[k:k + self.batch], n=1, temperature=self.temperature, **self.shaping,
                                   max_new_tokens=self.max_new_tokens, seed=derive_seed(self.seed, k // self.batch))
            gens += part
        s = score([g.text for g in gens], [r["reference"] for r in self.prompts], [r["prompt"] for r in self.prompts],
                  self.job.rewards, self.job.reward_params, self.metrics)
        row = {"step": int(step), "n_prompts": len(gens), "reward": _mean(s.total),
               **{f"reward/{n}": _mean(v) for n, v in s.components.items()},
               **{c: _mean(v) for c, v in s.metrics.items()},
               "completion_len_mean": _mean([len(g.token_ids) for g in gens]),
               "truncated_frac": _mean([g.finish_reason == "length" for g in gens])}
        row["seconds"] = time.perf_counter() - t0
        self.rows.append({n: row.get(n) for n in self.schema.names})
        self.rows.sort(key=lambda r: r["step"])
        return self.rows[[r["step"] for r in self.rows].index(step)]

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=self.schema)

    def write(self, path: str | os.PathLike) -> None:
        """Every row so far, atomically (zero rows when evaluation is off)."""
        write_table(path, self.table(), self.schema)

    def save(self, folder: str | os.PathLike) -> None:
        """Into a checkpoint being built: every row so far."""
        self.write(Path(folder) / EVAL_FILE)

    def restore(self, checkpoint: str | os.PathLike, up_to_step: int) -> None:
        """The rows up to ``up_to_step`` from a checkpoint's copy (none when it has no copy)."""
        import pyarrow.parquet as pq

        path = Path(checkpoint) / EVAL_FILE
        if not path.exists():
            self.rows = []
            return
        self.rows = [{n: r.get(n) for n in self.schema.names} for r in pq.read_table(path).to_pylist()
                     if r["step"] <= up_to_step]


def _mean(values) -> float | None:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()) if a.size else None


def eval_line(row: dict) -> str:
    """The evaluation's stderr line: step, reward and the task metrics."""
    shown = {k: v for k, v in row.items() if k == "reward" or k.startswith(("accuracy/", "format/"))}
    return f"eval step {row['step']}: " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()) + \
        f" len={_fmt(row['completion_len_mean'])} ({row['n_prompts']} prompts, {row['seconds']:.2f}s)"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


# -- rollout tables ----------------------------------------------------------------------------------------------

def rollout_records(step: int, prompt_ids, groups, sample_idx, completions, totals, components: dict,
                    advantages, n_tokens, truncated) -> list[dict[str, Any]]:
    """Rows of the rollouts table for one batch (every argument but ``step`` and ``components`` one per
    completion; ``components``: reward name -> unweighted values)."""
    comps = {n: np.asarray(v, dtype=np.float64) for n, v in components.items()}
    return [{"step": int(step), "prompt_id": str(prompt_ids[i]), "group": int(groups[i]),
             "sample_idx": int(sample_idx[i]), "completion": completions[i], "reward": float(totals[i]),
             **{f"reward/{n}": float(v[i]) for n, v in comps.items()},
             "advantage": float(advantages[i]), "n_tokens": int(n_tokens[i]), "truncated": bool(truncated[i])}
            for i in range(len(completions))]


def chunk_name(first: int, last: int) -> str:
    """``steps-<first>-<last>.parquet``: the rollouts of trainer steps ``first`` to ``last`` (inclusive)."""
    return f"steps-{first:06d}-{last:06d}.parquet"


CHUNK = re.compile(r"steps-(\d{6,})-(\d{6,})\.parquet$")


class RolloutLog:
    """Every training completion, when ``enabled``.

    ``pending`` holds the completions since the last checkpoint. At each checkpoint they are written (atomically,
    before the checkpoint itself) as one chunk file into ``chunks``, a folder beside the checkpoints that is not a
    rule output, so neither Snakemake's clean-up of an incomplete job nor checkpoint pruning removes it. A resumed
    run drops the chunks of steps at or after the checkpoint it resumes from (sampled by the lost part of the
    killed run); ``write`` copies the chunks and the completions after the last checkpoint into the final folder,
    so a resumed run ends with exactly the files of an uninterrupted one.
    """

    def __init__(self, rewards: list[str], chunks: str | os.PathLike | None, enabled: bool = True):
        self.schema = rollouts_schema(list(rewards))
        self.chunks = Path(chunks) if chunks is not None else None
        self.enabled = enabled and self.chunks is not None
        self.pending: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        if self.enabled:
            self.pending += [{n: r.get(n) for n in self.schema.names} for r in rows]

    def pending_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.pending, schema=self.schema)

    def _files(self) -> list[tuple[int, int, Path]]:
        if self.chunks is None or not self.chunks.is_dir():
            return []
        return sorted((int(m.group(1)), int(m.group(2)), p) for p in self.chunks.iterdir()
                      if (m := CHUNK.match(p.name)))

    def checkpoint(self, run=None, step: int | None = None, **log_kw) -> None:
        """A checkpoint is about to be written: the completions since the previous one become a chunk file (and
        the W&B run's ``rollouts`` table at ``step``), and a new chunk starts."""
        if not self.enabled or not self.pending:
            return
        from rlmeta.tracking import log_table

        table = self.pending_table()
        steps = table.column("step").to_pylist()
        write_table(self.chunks / chunk_name(min(steps), max(steps)), table, self.schema)
        log_table(run, "rollouts", table, max(steps) if step is None else step, **log_kw)
        self.pending = []

    def restore(self, step: int) -> None:
        """Start (``step`` 0) or resume at trainer step ``step``: rows of steps ``>= step`` are dropped from the
        chunks on disk (a chunk that straddles ``step`` keeps its earlier rows)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.pending = []
        for first, last, path in self._files():
            if last < step:
                continue
            if first < step:
                table = pq.read_table(path).cast(self.schema)
                kept = table.filter(pc.less(table.column("step"), step))
                steps = kept.column("step").to_pylist()
                write_table(self.chunks / chunk_name(min(steps), max(steps)), kept, self.schema)
            path.unlink(missing_ok=True)

    def log_pending(self, run, step: int, **log_kw) -> None:
        """The completions since the last checkpoint (the last chunk, at the end of training) to W&B."""
        if self.enabled and self.pending:
            from rlmeta.tracking import log_table

            log_table(run, "rollouts", self.pending_table(), step, **log_kw)

    def write(self, path: str | os.PathLike) -> list[Path]:
        """Write the folder ``path`` atomically: the chunk files, then one of the completions after the last
        checkpoint; empty when not enabled. Returns the files (their final paths)."""
        names = []
        with atomic_dir(path) as tmp:
            if self.enabled:
                for _, _, f in self._files():
                    shutil.copyfile(f, tmp / f.name)
                    names.append(Path(path) / f.name)
                if self.pending:
                    table = self.pending_table()
                    steps = table.column("step").to_pylist()
                    name = chunk_name(min(steps), max(steps))
                    write_table(tmp / name, table, self.schema)
                    names.append(Path(path) / name)
        return sorted(names)


def read_rollouts(folder: str | os.PathLike) -> pa.Table | None:
    """Every chunk of a rollouts folder as one table, in step order (None when the folder has no chunk)."""
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(folder).glob("steps-*.parquet") if CHUNK.match(p.name))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None
