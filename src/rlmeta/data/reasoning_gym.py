"""reasoning-gym tasks -> ``<out_dir>/{train,test}.parquet`` (schema ``RG_PROBLEMS``).

Each configured task is one reasoning-gym generator (``reasoning_gym.create_dataset(name, **params)``)
seeded with ``derive_seed("reasoning_gym", seed, name)``; item ``i`` of a generator depends on its
seed and ``i`` only, so the same settings give byte-identical tables. Items are shared out evenly over
the tasks (the first tasks get one more when a size does not divide). With ``distinct`` (the
default) one stream per task fills the test split first and then train, skipping every question seen
before, so no question is trained on and evaluated; otherwise each split has its own stream
(``.../train``, ``.../test``) and a small task's questions recur.

A row keeps what the task's own verifier needs (``score_answer(answer, entry)``): the question, the
gold answer, the entry's metadata and the task's config, as JSON (``rlmeta.rewards.reasoning_gym``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from rlmeta.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
RESERVED = ("seed", "size")
"""Config fields of every generator that the workflow sets itself."""
MAX_DRAWS = 50
"""A task may draw up to this many times the items it needs before ``distinct`` gives up."""


@functools.cache
def registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's task name -> (dataset class, config dataclass); imported once (about 3 s)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings of its dependencies (cellpylib)
        from reasoning_gym.factory import DATASETS
    return DATASETS


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def check_task(name: str, params: dict, where: str = "tasks") -> None:
    """ValueError (one line) unless ``name`` is a reasoning-gym task and ``params`` fit its config class."""
    tasks = registry()
    if name not in tasks:
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"'{name}' is not a reasoning-gym task{hint}; e.g. basic_arithmetic, chain_sum "
                         f"({len(tasks)} tasks: reasoning_gym.factory.DATASETS)")
    fields = {f.name: f for f in dataclasses.fields(tasks[name][1])}
    allowed = ", ".join(f"{k} (default {_default(f)!r})" for k, f in fields.items() if k not in RESERVED)
    for key, value in params.items():
        if key in RESERVED:
            raise ValueError(f"{where}.{key}: set by the workflow (the dataset's seed, train_size and eval_size); "
                             "drop it")
        if key not in fields:
            raise ValueError(f"{where}.{key}: task '{name}' has no parameter '{key}'; its parameters: {allowed}")
        default = _default(fields[key])
        if not _same_type(value, default):
            raise ValueError(f"{where}.{key} is {value!r} ({type(value).__name__}); task '{name}' expects "
                             f"{type(default).__name__} like its default {default!r}")
    try:
        cfg = tasks[name][1](**params, seed=0, size=1)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: reasoning-gym rejects {params}: {e or type(e).__name__}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def _same_type(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or float(value).is_integer())
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def generator(name: str, params: dict, seed: int, size: int):
    """The reasoning-gym dataset of task ``name`` (``params`` + seed and size)."""
    cls, config = registry()[name]
    return cls(config=config(**params, seed=seed, size=size))


def shares(total: int, n: int) -> list[int]:
    """``total`` items shared over ``n`` tasks, the first ones getting the remainder."""
    return [total // n + (i < total % n) for i in range(n)]


def _row(task: str, split: str, index: int, entry: dict, params: dict) -> dict:
    return dict(problem_id=f"reasoning_gym/{task}/{split}/{index}", source="reasoning_gym", split=split, task=task,
                question=entry["question"], answer=str(entry["answer"]), metadata=_json(entry.get("metadata", {})),
                config=_json(params))


def generate(tasks: dict[str, dict], train_size: int, eval_size: int, seed: int,
             distinct: bool = True) -> dict[str, list[dict]]:
    """Split -> ``RG_PROBLEMS`` rows (tasks in config order, items in draw order)."""
    from rlmeta.policy.base import derive_seed

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    n_train, n_test = shares(train_size, len(tasks)), shares(eval_size, len(tasks))
    for (task, params), want_train, want_test in zip(tasks.items(), n_train, n_test):
        if not distinct:
            for split, want in (("train", want_train), ("test", want_test)):
                gen = generator(task, params, derive_seed("reasoning_gym", seed, task, split), max(want, 1))
                out[split] += [_row(task, split, i, gen[i], params) for i in range(want)]
            continue
        limit = MAX_DRAWS * (want_train + want_test)
        gen = generator(task, params, derive_seed("reasoning_gym", seed, task), limit)
        seen: set[str] = set()
        wants = {"test": want_test, "train": want_train}
        got = {"test": 0, "train": 0}
        for i in range(limit):
            split = "test" if got["test"] < wants["test"] else "train"
            if got[split] >= wants[split]:
                break
            entry = gen[i]
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
            out[split].append(_row(task, split, got[split], entry, params))
            got[split] += 1
        else:
            raise UserError(f"reasoning-gym task '{task}' with {params}: only {len(seen)} distinct questions in "
                            f"{limit} draws, {want_train + want_test} needed; lower train_size/eval_size, widen the "
                            "task, or set distinct: false")
    return out


def prepare_reasoning_gym(dataset, out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write ``train.parquet`` and ``test.parquet`` of a ``ReasoningGymDataset``; split -> rows written.

    ``seed`` is used when the dataset's own ``seed`` is null (the workflow's seed).
    """
    import pyarrow as pa

    from rlmeta.io import write_table
    from rlmeta.tables import RG_PROBLEMS

    seed = dataset.seed if dataset.seed is not None else seed
    rows = generate(dataset.tasks, dataset.train_size, dataset.eval_size, seed, dataset.distinct)
    for split in SPLITS:
        write_table(Path(out_dir) / f"{split}.parquet", pa.Table.from_pylist(rows[split], schema=RG_PROBLEMS),
                    RG_PROBLEMS)
    return {split: len(r) for split, r in rows.items()}


def command(p: argparse.ArgumentParser):
    """``rlmeta prepare-reasoning-gym``."""
    from rlmeta.cli import add_settings
    from rlmeta.settings import ReasoningGymDataset

    add_settings(p, "dataset", ReasoningGymDataset, "the dataset block, e.g. '{\"kind\": \"reasoning_gym\", "
                 "\"tasks\": {\"basic_arithmetic\": {\"max_terms\": 2, \"max_digits\": 1}}}'", required=True)
    p.add_argument("--out-dir", required=True, help="output folder (gets train.parquet, test.parquet)")
    p.add_argument("--seed", type=int, default=0, help="seed when the dataset's own seed is null (the workflow's)")

    def run(a):
        start = time.monotonic()
        counts = prepare_reasoning_gym(a.dataset, a.out_dir, a.seed)
        log.info("prepare_reasoning_gym done in %.1fs: %s", time.monotonic() - start, counts)
    return run
