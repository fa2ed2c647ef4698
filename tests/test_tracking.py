"""rlmeta.tracking: train_metrics parquet, W&B runs (real offline wandb), NaN guard, secret scrubbing."""
from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlmeta.tables import train_metrics_schema
from rlmeta.tracking import MetricsWriter, NonFiniteMetricError, check_finite, scrub_secrets, wandb_run

FAKE_KEY = "fakeWandbKey0123456789abcdefDEADBEEF"


def _row(step, **kw):
    base = dict(step=step, loss=0.1 * step, reward_mean=0.5, reward_std=0.1, kl=None, clip_ratio=0.0,
                grad_norm=1.0, lr=1e-3, tokens=100 * step, step_seconds=0.2, zero_std_frac=0.0,
                completion_len_mean=7.5)
    return {**base, **kw}


def test_metrics_writer_schema_and_atomic_rewrite(tmp_path):
    path = tmp_path / "m" / "train_metrics.parquet"
    with MetricsWriter(path, ["reward/toy"]) as w:
        w.add(_row(1, **{"reward/toy": 0.25}))
        w.flush()
        assert pq.read_table(path).num_rows == 1
        w.add(_row(2))
    table = pq.read_table(path)
    assert table.schema == train_metrics_schema(["reward/toy"])
    assert table.column("step").to_pylist() == [1, 2]
    assert table.column("reward/toy").to_pylist() == [0.25, None]
    assert table.column("kl").to_pylist() == [None, None]
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temp files left behind"
    with pytest.raises(KeyError, match="not train_metrics columns"):
        MetricsWriter(path).add(_row(3, bogus=1.0))


def test_metrics_writer_resume_keeps_rows_up_to_step(tmp_path):
    path = tmp_path / "train_metrics.parquet"
    with MetricsWriter(path) as w:
        for s in range(1, 6):
            w.add(_row(s))
    w2 = MetricsWriter(path, resume_step=3)
    w2.add(_row(4, loss=9.0))
    w2.close()
    t = pq.read_table(path)
    assert t.column("step").to_pylist() == [1, 2, 3, 4]
    assert t.column("loss").to_pylist()[-1] == 9.0


def test_check_finite():
    check_finite({"loss": 0.5, "kl": None, "tokens": 3}, step=1)
    with pytest.raises(NonFiniteMetricError) as e:
        check_finite({"loss": math.nan, "grad_norm": math.inf, "lr": 1e-3}, step=12, last_checkpoint="out/checkpoint-10")
    msg = str(e.value)
    assert msg.startswith("non-finite loss, grad_norm at step 12: loss=nan, grad_norm=inf")
    assert "last good checkpoint: out/checkpoint-10" in msg
    with pytest.raises(FloatingPointError, match="none"):
        check_finite({"loss": float("-inf")}, step=1)


def test_scrub_secrets():
    cfg = {"lr": 1, "WANDB_API_KEY": "x", "nested": {"hub_token": "y", "db_password": "z", "keep": [{"secret": 1, "a": 2}]}}
    assert scrub_secrets(cfg) == {"lr": 1, "nested": {"keep": [{"a": 2}]}}


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file (LevelDB log format: 7-byte file header, 32 KiB blocks, 7-byte
    chunk headers crc32/len/type), parsed as wandb's protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def wandb_records_when_flushed(path: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's ``exit`` record is on disk: wandb-core writes the file in its own
    process and may still be flushing when ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = {"train": {"learning_rate": 1e-3}, "api_key": FAKE_KEY, "nested": {"hf_token": FAKE_KEY}}
    with wandb_run("offline", "rlmeta-test", None, "unit", tmp_path, config) as run:
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
        assert "WANDB_API_KEY" not in os.environ
        for step in range(3):
            run.log({"train/loss": 1.0 - step * 0.25, "train/reward": 0.1 * step}, step=step)
    assert os.environ["WANDB_API_KEY"] == FAKE_KEY and "WANDB_MODE" not in os.environ

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
    with wandb_run("disabled", dir=tmp_path, config={"a": 1}) as run:
        run.log({"x": 1.0})
    assert not (tmp_path / "wandb").exists() or not list((tmp_path / "wandb").glob("*run-*"))
    with pytest.raises(ValueError, match="unknown wandb mode"):
        with wandb_run("sometimes"):
            pass
