"""MATH step: answer extraction vs MATH-500, parsing, per-subject task splits, samples."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlmeta.answers import last_boxed
from rlmeta.cli import main
from rlmeta.data.math_problems import SLUGS, balanced_head, parse_level, prepare_math, split_math_tasks, split_sizes
from rlmeta.settings import MATH_TYPES
from rlmeta.settings import ROOT as REPO
from rlmeta.tables import PROBLEMS

SAMPLE = REPO / "resources" / "math"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample_train(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("math")
    assert prepare_math(str(SAMPLE), out) == {"train": 420, "test": 140}
    return out / "train.parquet"


def test_math500_answers_agree_with_math_verify(shared_data):
    from math_verify import parse, verify

    rows = [json.loads(line) for line in (shared_data / "math" / "math500_test.jsonl").read_text().splitlines()]
    differ = []
    for r in rows:
        got = last_boxed(r["solution"])
        ok = got is not None and verify(parse(f"\\boxed{{{r['answer']}}}"), parse(f"\\boxed{{{got}}}"))
        if not ok:
            differ.append((r["unique_id"], got, r["answer"]))
    for d in differ:
        print("MATH-500 answer differs:", d)
    agreement = 1 - len(differ) / len(rows)
    print(f"MATH-500 agreement: {agreement:.2%} of {len(rows)}")
    assert len(rows) == 500 and agreement >= 0.99


@pytest.mark.parametrize("text, expected", [
    (r"so $x=\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1} then \boxed{\sqrt{\{2\}}}", r"\sqrt{\{2\}}"),
    (r"the answer is $\fbox{42}$", "42"),
    (r"\boxed{1} or \fbox{ 7 }", "7"),
    (r"\boxed 5$", "5"),
    (r"\boxed{unbalanced", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_parse_level():
    assert [parse_level(x) for x in ("Level 3", "Level ?", 4, None, "5")] == [3, None, 4, None, 5]


def test_full_shared_math(shared_data, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert prepare_math(str(shared_data / "math"), tmp_path) == {"train": 7498, "test": 5000}
    # the release has two train solutions with an empty \boxed{}: dropped, each named
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w.split(": ")[1] for w in warned] == ["row 5529 dropped", "row 5531 dropped"]
    train = pq.read_table(tmp_path / "train.parquet")
    assert train.schema.equals(PROBLEMS, check_metadata=False)
    assert train.column("level").null_count == 2  # the two "Level ?" rows of the release
    assert set(train.column("subject").to_pylist()) == set(SLUGS)
    assert train.column("problem_id").to_pylist()[0] == "train/algebra/0.json"


def test_sample_schema_and_fields(sample_train):
    table = pq.read_table(sample_train)
    assert table.schema.equals(PROBLEMS, check_metadata=False)
    rows = table.to_pylist()
    assert {r["subject"] for r in rows} == set(SLUGS) and all(1 <= r["level"] <= 3 for r in rows)
    assert all(r["answer"] and r["source"] == "math" and r["split"] == "train" for r in rows)
    ids = [r["problem_id"] for r in rows]
    assert len(set(ids)) == len(ids)


def test_fallback_ids_bad_rows_and_balanced_cap(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    rec = {"problem": "p", "level": "Level ?", "type": "Geometry", "solution": r"so \boxed{3}"}
    lines = [rec, dict(rec, type="Astrology"), dict(rec, solution="no box"), dict(rec, level="Level 2"), "{bad"]
    (src / "train.jsonl").write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    (src / "test.jsonl").write_text(json.dumps(dict(rec, type="Algebra")) + "\n")
    caplog.set_level(logging.WARNING, logger="rlmeta.data.math_problems")
    assert prepare_math(str(src), tmp_path / "out") == {"train": 2, "test": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for row, why in ((1, "unknown subject"), (2, "boxed"), (4, "invalid JSON")):
        assert any(f"train.jsonl: row {row} dropped: " in w and why in w for w in warnings), (row, warnings)
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [(r["problem_id"], r["level"]) for r in rows] == [("math/train/geometry/0", None),
                                                             ("math/train/geometry/1", 2)]
    # caps take subjects round-robin, keeping source order
    fake = [{"subject": s, "i": i} for s in SLUGS for i in range(3)]
    kept = balanced_head(fake, 9)
    assert [r["subject"] for r in kept].count("algebra") == 2 and len(kept) == 9
    assert kept == sorted(kept, key=fake.index)


def test_hendrycks_hub_id_loads_each_subject_config(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        kind = {v: k for k, v in MATH_TYPES.items()}[config]
        return [{"problem": "p", "level": "Level 1", "type": kind, "solution": r"\boxed{1}"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert prepare_math("EleutherAI/hendrycks_math", tmp_path, max_test=3) == {"train": 7, "test": 3}
    assert calls[:7] == [("EleutherAI/hendrycks_math", s, "train") for s in SLUGS]


def test_task_split_ratios_disjoint_reproducible(sample_train, tmp_path):
    sizes = split_math_tasks(sample_train, SLUGS, 0.30, 0.40, 1234, tmp_path / "a")
    assert sizes == {s: {"support": 18, "query": 24, "heldout": 18} for s in SLUGS}
    train = pq.read_table(sample_train).to_pylist()
    for subject in SLUGS:
        parts = {k: pq.read_table(tmp_path / "a" / subject / f"{k}.parquet") for k in ("support", "query", "heldout")}
        ids = {k: t.column("problem_id").to_pylist() for k, t in parts.items()}
        for k, t in parts.items():
            assert t.schema.equals(PROBLEMS, check_metadata=False)
            assert set(t.column("split").to_pylist()) == {k} and set(t.column("subject").to_pylist()) == {subject}
        assert not (set(ids["support"]) & set(ids["query"])) and not (set(ids["query"]) & set(ids["heldout"]))
        assert not (set(ids["support"]) & set(ids["heldout"]))
        all_ids = ids["support"] + ids["query"] + ids["heldout"]
        assert sorted(all_ids) == sorted(r["problem_id"] for r in train if r["subject"] == subject)
        assert all_ids != sorted(all_ids, key=[r["problem_id"] for r in train].index)  # shuffled, not source order
    assert main(["split-math-tasks", "--train", str(sample_train), "--seed", "1234",
                 "--out-dir", str(tmp_path / "b")]) == 0
    split_math_tasks(sample_train, ["geometry"], 0.30, 0.40, 99, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["geometry"]
    for subject in SLUGS:
        for k in ("support", "query", "heldout"):
            assert sha(tmp_path / "a" / subject / f"{k}.parquet") == sha(tmp_path / "b" / subject / f"{k}.parquet")
    assert sha(tmp_path / "a" / "geometry" / "support.parquet") != sha(tmp_path / "c" / "geometry" / "support.parquet")


def test_split_sizes_and_errors(sample_train, tmp_path):
    assert split_sizes(10, 0.3, 0.4) == (3, 4, 3)
    assert split_sizes(2, 0.3, 0.4) == (1, 1, 0)
    assert split_sizes(10, 0.5, 0.5) == (5, 5, 0)
    with pytest.raises(ValueError, match="sum"):
        split_math_tasks(sample_train, SLUGS, 0.7, 0.4, 0, tmp_path)
    with pytest.raises(ValueError, match="unknown MATH subjects"):
        split_math_tasks(sample_train, ["astrology"], 0.3, 0.4, 0, tmp_path)


def test_prepare_byte_identical_reruns(tmp_path):
    for run in ("a", "b"):
        assert main(["prepare-math", "--source", str(SAMPLE), "--out-dir", str(tmp_path / run),
                     "--max-train", "70"]) == 0
    for split in ("train", "test"):
        assert sha(tmp_path / "a" / f"{split}.parquet") == sha(tmp_path / "b" / f"{split}.parquet")
    subjects = pq.read_table(tmp_path / "a" / "train.parquet").column("subject").to_pylist()
    assert {s: subjects.count(s) for s in SLUGS} == {s: 10 for s in SLUGS}


def test_resource_samples_are_reproducible(shared_data, tmp_path):
    script = REPO / "scripts" / "make_resource_samples.py"
    spec = importlib.util.spec_from_file_location("make_resource_samples", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--shared", str(shared_data), "--out", str(tmp_path)]) == 0
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(made) == 10
    for rel in made:
        assert sha(tmp_path / rel) == sha(REPO / "resources" / rel), rel


def test_steps_help():
    for step, flag in (("prepare-math", "--max-test"), ("split-math-tasks", "--support-ratio")):
        out = subprocess.run([sys.executable, "-m", "rlmeta", step, "--help"], capture_output=True, text=True,
                             check=True, cwd=REPO)
        assert flag in out.stdout


def test_split_cli_errors_are_one_line(tmp_path, capsys):
    """A missing train file is an argparse error; too few rows of a subject is a one-line user error."""
    with pytest.raises(SystemExit) as e:
        main(["split-math-tasks", "--train", str(tmp_path / "nope.parquet"), "--seed", "1", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "nope.parquet: no such file" in capsys.readouterr().err
    assert main(["prepare-math", "--source", str(SAMPLE), "--out-dir", str(tmp_path / "one"), "--max-train", "7"]) == 0
    capsys.readouterr()
    assert main(["split-math-tasks", "--train", str(tmp_path / "one" / "train.parquet"), "--seed", "1",
                 "--out-dir", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlmeta split-math-tasks: error: need at least 2 rows of a subject"), err
