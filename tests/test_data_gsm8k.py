"""GSM8K step: full real data, answer cleaning, reported bad rows, reproducibility."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmeta.answers import gsm8k_final_answer, to_float
from rlmeta.cli import main
from rlmeta.data.gsm8k import prepare_gsm8k
from rlmeta.errors import UserError
from rlmeta.settings import ROOT as REPO
from rlmeta.tables import PROBLEMS


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_shared_data_every_answer_is_a_number(shared_data, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert prepare_gsm8k(str(shared_data / "gsm8k"), tmp_path) == {"train": 7473, "test": 1319}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for split, n in (("train", 7473), ("test", 1319)):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert table.schema.equals(PROBLEMS, check_metadata=False) and len(table) == n
        answers = table.column("answer").to_pylist()
        assert all(to_float(a) is not None and "," not in a for a in answers)
        assert table.column("problem_id").to_pylist()[:2] == [f"gsm8k/{split}/0", f"gsm8k/{split}/1"]
        assert table.column("subject").null_count == table.column("level").null_count == n
        assert set(table.column("split").to_pylist()) == {split}
        assert set(table.column("source").to_pylist()) == {"gsm8k"}
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert train[0]["answer"] == "72" and train[0]["solution"].endswith("#### 72")
    assert train[345]["answer"] == "1080"  # "#### 1,080" in the source


@pytest.mark.parametrize("solution, answer", [
    ("so 3+4=7\n#### 7", "7"),
    ("#### 1,080", "1080"),
    ("#### $1,250", "1250"),
    ("#### 15.", "15"),
    ("#### -3", "-3"),
    ("#### 0.75", "0.75"),
    ("#### 2,520,000\n", "2520000"),
    ("no marker here", None),
])
def test_final_answer_cleaning(solution, answer):
    assert gsm8k_final_answer(solution) == answer


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


GOOD = json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"})


def test_bad_rows_are_reported_with_file_and_row(tmp_path, caplog):
    src = tmp_path / "src"
    write_jsonl(src / "train.jsonl", [
        GOOD,
        json.dumps({"question": "q", "answer": "no final answer"}),
        "{not json",
        json.dumps({"question": "q", "answer": "#### about five"}),
        json.dumps({"answer": "#### 3"}),
        GOOD,
    ])
    write_jsonl(src / "test.jsonl", [GOOD])
    caplog.set_level(logging.INFO, logger="rlmeta.data.gsm8k")
    assert prepare_gsm8k(str(src), tmp_path / "out") == {"train": 2, "test": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    for row, why in ((1, "####"), (2, "invalid JSON"), (3, "not a number"), (4, "missing question")):
        assert any(f"train.jsonl: row {row} dropped" in w and why in w for w in warnings), (row, warnings)
    assert any("4 dropped" in r.getMessage() for r in caplog.records)
    ids = pq.read_table(tmp_path / "out" / "train.parquet").column("problem_id").to_pylist()
    assert ids == ["gsm8k/train/0", "gsm8k/train/5"]  # index in the source file


def test_parquet_source_max_rows_and_byte_identical_reruns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (REPO / "resources" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), src / f"{split}.parquet")
    assert prepare_gsm8k(str(src), tmp_path / "a", max_train=50, max_test=10) == {"train": 50, "test": 10}
    assert main(["prepare-gsm8k", "--source", str(REPO / "resources" / "gsm8k"), "--out-dir", str(tmp_path / "b"),
                 "--max-train", "50", "--max-test", "10"]) == 0
    assert main(["prepare-gsm8k", "--source", str(REPO / "resources" / "gsm8k"), "--out-dir", str(tmp_path / "c"),
                 "--max-train", "50", "--max-test", "10"]) == 0
    for split in ("train", "test"):  # same rows from parquet or jsonl, and identical bytes on rerun
        a, b, c = (sha(tmp_path / run / f"{split}.parquet") for run in ("a", "b", "c"))
        assert a == b == c, split
    ids = pq.read_table(tmp_path / "a" / "train.parquet").column("problem_id").to_pylist()
    assert ids == [f"gsm8k/train/{i}" for i in range(50)]


def test_hub_id_uses_load_dataset_main(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": f"{split} q", "answer": "#### 1"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert prepare_gsm8k("openai/gsm8k", tmp_path) == {"train": 1, "test": 1}
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope" / "deeper" / "x"
    with pytest.raises(UserError, match=f"^source: {re.escape(str(missing))} does not exist"):
        prepare_gsm8k(str(missing), tmp_path)
    with pytest.raises(UserError, match="train.jsonl or train.parquet"):
        prepare_gsm8k(str(tmp_path), tmp_path / "out")
    # owner/name under an existing folder is a typo, not a hub id (no download attempt)
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError, match="resources/gsm8k_typo does not exist .*'resources' is a local folder"):
        prepare_gsm8k("resources/gsm8k_typo", tmp_path / "out")
    # on the command line: exit status 2 and one line naming the step
    assert main(["prepare-gsm8k", "--source", str(missing), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rlmeta prepare-gsm8k: error: source: {missing} does not exist"), err
    assert not (tmp_path / "out").exists()


def test_step_help():
    out = subprocess.run([sys.executable, "-m", "rlmeta", "prepare-gsm8k", "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert "--max-train" in out.stdout and "--source" in out.stdout
