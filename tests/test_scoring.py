"""End-to-end scoring of a small responses table through the CLI entry point."""
import json

import pyarrow as pa
import pytest

from rlmeta import scoring
from rlmeta.io import read_table, write_table
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
COMPLETIONS = [GOOD, GOOD.replace("\n4\n", "\n5\n"), "the " * 50, "", "$\\boxed{4}$", "<answer>4</answer>"]


def _prompts():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    return pa.Table.from_pylist(
        [{"prompt_id": p, "experiment": "e", "item_id": p, "task": "t", "split": "eval", "prompt": msgs,
          "reference": "4", "reference_completion": None} for p in ("p0", "p1")],
        schema=PROMPTS,
    )


def _responses():
    return pa.Table.from_pylist(
        [{"prompt_id": f"p{i % 2}", "sample_idx": i // 2, "policy": "base", "completion": c, "n_tokens": 3,
          "finish_reason": "stop", "temperature": 0.8, "seed": 1} for i, c in enumerate(COMPLETIONS)],
        schema=RESPONSES,
    )


def test_score_cli_totals_are_weighted_sums(tmp_path):
    write_table(tmp_path / "prompts.parquet", _prompts(), PROMPTS)
    write_table(tmp_path / "resp.parquet", _responses(), RESPONSES)
    rewards = {"xml_strict": 0.5, "xml_count": 0.25, "gsm8k_correct": 1.0, "math_correct": 2.0, "coherence": 0.1}
    args = ["--prompts", str(tmp_path / "prompts.parquet"), "--responses", str(tmp_path / "resp.parquet"),
            "--out", str(tmp_path / "rewards.parquet"), "--rewards-json", json.dumps(rewards),
            "--params-json", json.dumps({"math_correct": {"timeout_s": 3}}), "--workers", "2"]
    assert scoring.main(args) == 0
    t = read_table(tmp_path / "rewards.parquet")
    assert t.schema.equals(rewards_schema(list(rewards)))
    rows = t.to_pylist()
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [(f"p{i % 2}", i // 2) for i in range(6)]
    for r in rows:
        assert r["reward"] == pytest.approx(sum(w * r[n] for n, w in rewards.items()))
        assert all(0.0 <= r[n] <= 1.0 for n in rewards)
    col = {n: [r[n] for r in rows] for n in rewards}
    assert col["xml_strict"] == [1, 1, 0, 0, 0, 0]
    assert col["gsm8k_correct"] == [1, 0, 0, 0, 1, 1]
    assert col["math_correct"] == [0, 0, 0, 0, 1, 0]
    assert rows[0]["reward"] == pytest.approx(0.5 + 0.25 + 1.0 + 0.1 * rows[0]["coherence"])
    assert rows[3]["reward"] == 0.0


def test_score_responses_errors():
    with pytest.raises(ValueError, match="valid rewards"):
        scoring.score_responses(_prompts(), _responses(), {"bogus": 1.0})
    with pytest.raises(ValueError, match="not in the prompts table"):
        scoring.score_responses(_prompts().slice(0, 1), _responses(), {"xml_soft": 1.0})
