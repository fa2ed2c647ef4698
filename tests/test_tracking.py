"""rlmeta.tracking: the train_metrics table, W&B runs (real offline wandb), secret scrubbing.

The divergence guard (which replaced ``check_finite``: NaN/inf and the divergence conditions) is tested in
test_guard.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rlmeta.settings import WandbSettings
from rlmeta.tables import train_metrics_schema
from rlmeta.testing.wandb_files import FAKE_KEY, wandb_records_when_flushed
from rlmeta.tracking import METRICS_FILE, MetricsTable, scrub_secrets, wandb_run


def _row(step, **kw):
    base = dict(step=step, loss=0.1 * step, reward_mean=0.5, reward_std=0.1, kl=None, clip_ratio=0.0,
                grad_norm=1.0, lr=1e-3, tokens=100 * step, step_seconds=0.2, zero_std_frac=0.0,
                completion_len_mean=7.5, param_norm=20.0 + step)
    return {**base, **kw}


def test_metrics_table_schema_and_atomic_write(tmp_path):
    path = tmp_path / "m" / "train_metrics.parquet"
    m = MetricsTable(["reward/toy"])
    m.add(_row(1, **{"reward/toy": 0.25}))
    m.add(_row(2, loss=np.float32(0.5)))  # numpy scalars become plain values
    assert not path.exists()  # nothing is written until asked (the trainers write once, at the end)
    m.write(path)
    table = pq.read_table(path)
    assert table.schema == train_metrics_schema(["reward/toy"]) == m.table().schema
    assert table.column("step").to_pylist() == [1, 2]
    assert table.column("reward/toy").to_pylist() == [0.25, None]
    assert table.column("kl").to_pylist() == [None, None]
    assert table.column("param_norm").to_pylist() == [21.0, 22.0]  # the weights' norm, watched by the guard
    assert table.column("loss").to_pylist() == [pytest.approx(0.1), 0.5] and type(m.rows[1]["loss"]) is float
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temp files left behind"
    m.add(_row(3))
    m.write(path)  # rewritten whole
    assert pq.read_table(path).column("step").to_pylist() == [1, 2, 3]
    with pytest.raises(KeyError, match="not train_metrics columns"):
        MetricsTable().add(_row(3, bogus=1.0))
    with pytest.raises(KeyError, match="needs 'step'"):
        MetricsTable().add({"loss": 1.0})


def test_metrics_table_restores_rows_up_to_the_checkpoint_step(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    first = MetricsTable(["reward/toy"])
    for s in range(1, 6):
        first.add(_row(s, **{"reward/toy": 0.1 * s}))
    first.write(ckpt / METRICS_FILE)
    resumed = MetricsTable(["reward/toy"])
    resumed.restore(ckpt, up_to_step=3)
    assert resumed.rows == first.rows[:3]
    resumed.add(_row(4, loss=9.0))
    t = resumed.table()
    assert t.column("step").to_pylist() == [1, 2, 3, 4]
    assert t.column("loss").to_pylist()[-1] == 9.0 and t.column("reward/toy").to_pylist()[-1] is None
    full = MetricsTable(["reward/toy"])
    full.restore(ckpt, up_to_step=5)
    assert full.table().equals(first.table())


def test_scrub_secrets():
    cfg = {"lr": 1, "WANDB_API_KEY": "x",
           "nested": {"hub_token": "y", "db_password": "z", "keep": [{"secret": 1, "a": 2}]}}
    assert scrub_secrets(cfg) == {"lr": 1, "nested": {"keep": [{"a": 2}]}}


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = {"train": {"learning_rate": 1e-3}, "api_key": FAKE_KEY, "nested": {"hf_token": FAKE_KEY}}
    with wandb_run(WandbSettings(mode="offline", project="rlmeta-test"), "unit", tmp_path, config) as run:
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
        assert os.environ["WANDB_PROJECT"] == "rlmeta-test" and "WANDB_API_KEY" not in os.environ
        for step in range(3):
            run.log({"train/loss": 1.0 - step * 0.25, "train/reward": 0.1 * step}, step=step)
    assert os.environ["WANDB_API_KEY"] == FAKE_KEY and "WANDB_MODE" not in os.environ
    assert "WANDB_DIR" not in os.environ and "WANDB_PROJECT" not in os.environ

    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(tmp_path.rglob("*"))
    records = wandb_records_when_flushed(files[0])
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["train/loss"] for h in history] == [1.0, 0.75, 0.5]
    configs = [r.run.config if r.WhichOneof("record_type") == "run" else r.config
               for r in records if r.WhichOneof("record_type") in ("run", "config")]
    config_keys = {i.key for c in configs for i in c.update}
    assert "train" in config_keys and "api_key" not in config_keys

    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"


@pytest.mark.slow
def test_wandb_disabled_writes_nothing(tmp_path):
    with wandb_run(WandbSettings(mode="disabled"), dir=tmp_path, config={"a": 1}) as run:
        run.log({"x": 1.0})
    assert not (tmp_path / "wandb").exists() or not list((tmp_path / "wandb").glob("*run-*"))
    mode = os.environ.get("WANDB_MODE")
    # the block's error goes through, and the environment is restored
    with pytest.raises(RuntimeError, match="inside the run"), wandb_run(WandbSettings(mode="disabled"), dir=tmp_path):
        assert os.environ["WANDB_MODE"] == "disabled"
        raise RuntimeError("inside the run")
    assert os.environ.get("WANDB_MODE") == mode
    with pytest.raises(ValidationError, match="mode"):
        WandbSettings(mode="sometimes")
