"""rlmeta.scoring: the one scoring path (rewards, weighted total, task metrics), end to end through `rlmeta score`."""
import json

import numpy as np
import pyarrow as pa
import pytest

from rlmeta import scoring
from rlmeta.cli import main
from rlmeta.errors import UserError
from rlmeta.io import read_table, write_table
from rlmeta.prompts import TEMPLATES
from rlmeta.rewards import mathverify
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema
from rlmeta.testing.rewards import registered

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
COMPLETIONS = [GOOD, GOOD.replace("\n4\n", "\n5\n"), "the " * 50, "", "$\\boxed{4}$", "<answer>4</answer>"]


def _prompts():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    return pa.Table.from_pylist(
        [{"prompt_id": p, "experiment": "e", "item_id": p, "task": "t", "split": "eval", "prompt": msgs,
          "reference": "4", "reference_completion": None} for p in ("p0", "p1")],
        schema=PROMPTS,
    )


def _responses(completions=COMPLETIONS):
    return pa.Table.from_pylist(
        [{"prompt_id": f"p{i % 2}", "sample_idx": i // 2, "policy": "base", "completion": c, "n_tokens": 3,
          "finish_reason": "stop", "temperature": 0.8, "seed": 1} for i, c in enumerate(completions)],
        schema=RESPONSES,
    )


def test_score_cli_totals_are_weighted_sums(tmp_path):
    write_table(tmp_path / "prompts.parquet", _prompts(), PROMPTS)
    write_table(tmp_path / "resp.parquet", _responses(), RESPONSES)
    rewards = {"xml_strict": 0.5, "xml_count": 0.25, "gsm8k_correct": 1.0, "math_correct": 2.0, "coherence": 0.1}
    mix = {"rewards": rewards, "reward_params": {"math_correct": {"timeout_s": 3, "workers": 2}}}
    args = ["score", "--prompts", str(tmp_path / "prompts.parquet"), "--responses", str(tmp_path / "resp.parquet"),
            "--out", str(tmp_path / "rewards.parquet"), "--template", "xml_cot", "--rewards", json.dumps(mix)]
    assert main(args) == 0
    metrics = list(TEMPLATES["xml_cot"].metrics)
    t = read_table(tmp_path / "rewards.parquet")
    assert t.schema.equals(rewards_schema(list(rewards), metrics))
    assert t.column_names[-len(metrics):] == metrics == ["accuracy/gsm8k_strict", "accuracy/gsm8k_flexible",
                                                         "accuracy/gsm8k_xml", "format/xml_strict", "format/xml_soft"]
    rows = t.to_pylist()
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [(f"p{i % 2}", i // 2) for i in range(6)]
    for r in rows:
        assert r["reward"] == pytest.approx(sum(w * r[n] for n, w in rewards.items()))
        assert all(0.0 <= r[n] <= 1.0 for n in [*rewards, *metrics])
    col = {n: [r[n] for r in rows] for n in [*rewards, *metrics]}
    assert col["xml_strict"] == [1, 1, 0, 0, 0, 0]
    assert col["gsm8k_correct"] == [1, 0, 0, 0, 1, 1]
    assert col["math_correct"] == [0, 0, 0, 0, 1, 0]
    assert col["accuracy/gsm8k_strict"] == [0, 0, 0, 0, 0, 0]  # no '####' anywhere
    assert col["accuracy/gsm8k_flexible"] == [1, 0, 0, 0, 1, 1]
    assert col["accuracy/gsm8k_xml"] == [1, 0, 0, 0, 0, 1]
    assert col["format/xml_strict"] == col["xml_strict"] and col["format/xml_soft"] == [1, 1, 0, 0, 0, 0]
    assert rows[0]["reward"] == pytest.approx(0.5 + 0.25 + 1.0 + 0.1 * rows[0]["coherence"])
    assert rows[3]["reward"] == 0.0


def test_score_cli_rejects_a_bad_reward_parameter_in_one_line(tmp_path, capsys):
    write_table(tmp_path / "prompts.parquet", _prompts(), PROMPTS)
    write_table(tmp_path / "resp.parquet", _responses(), RESPONSES)
    mix = {"rewards": {"math_correct": 1.0}, "reward_params": {"math_correct": {"timeout": 3}}}
    with pytest.raises(SystemExit) as e:
        main(["score", "--prompts", str(tmp_path / "prompts.parquet"), "--responses", str(tmp_path / "resp.parquet"),
              "--out", str(tmp_path / "rewards.parquet"), "--template", "math_boxed", "--rewards", json.dumps(mix)])
    assert e.value.code == 2 and not (tmp_path / "rewards.parquet").exists()
    err = capsys.readouterr().err
    assert "reward_params.math_correct.timeout" in err and "timeout_s (default 5.0), workers (default 2)" in err


def test_math_correct_runs_once_as_reward_and_metric(monkeypatch):
    calls = []
    real = mathverify.math_verify_batch

    def counting(pairs, *args, **kwargs):
        calls.append((list(pairs), kwargs))
        return real(pairs, *args, **kwargs)

    monkeypatch.setattr(mathverify, "math_verify_batch", counting)
    tpl = TEMPLATES["math_boxed"]
    completions = ["$\\boxed{\\frac{1}{2}}$", "$\\boxed{3}$", "no box"]
    refs = ["0.5", "3", "3"]
    s = scoring.score(completions, refs, None, tpl.default_rewards, {"math_correct": {"workers": 0}}, tpl.metrics)
    assert len(calls) == 1 and calls[0] == (list(zip(completions, refs)), {"workers": 0, "timeout_s": 5.0})
    assert s.components["math_correct"].tolist() == s.metrics["accuracy/math_verify"].tolist() == [1.0, 1.0, 0.0]
    assert s.metrics["format/boxed_present"].tolist() == [1.0, 1.0, 0.0] and s.total.tolist() == [1.0, 1.0, 0.0]


def test_each_scorer_runs_once_per_batch():
    calls = []

    def counting(completions, references, prompts=None, offset: float = 0.0):
        calls.append(len(completions))
        return [offset + (c == r) for c, r in zip(completions, references)]

    with registered("toy_count", counting, "counts its calls", batched=True):
        s = scoring.score(["a", "b", "c"], ["a", "x", "c"], None, {"toy_count": 2.0, "xml_soft": 1.0},
                          {"toy_count": {"offset": 0.0}}, {"accuracy/toy": "toy_count", "format/again": "toy_count"})
    assert calls == [3]  # one batched call although it is a reward and two metrics
    assert s.total.tolist() == [2.0, 0.0, 2.0]
    assert s.metrics["accuracy/toy"].tolist() == s.metrics["format/again"].tolist() == [1.0, 0.0, 1.0]
    assert list(s.components) == ["toy_count", "xml_soft"] and list(s.metrics) == ["accuracy/toy", "format/again"]


def test_score_responses_has_metric_columns():
    tpl = TEMPLATES["math_boxed"]
    completions = ["$\\boxed{4}$", "\\boxed{5}", "four", "$\\boxed{2+2}$"]
    t = scoring.score_responses(_prompts(), _responses(completions), {"math_correct": 1.0, "length": 0.5},
                                {"math_correct": {"workers": 0}, "length": {"min_words": 1, "max_words": 3}},
                                tpl.metrics)
    assert t.schema.equals(rewards_schema(["math_correct", "length"], list(tpl.metrics)))
    assert t.column_names == ["prompt_id", "sample_idx", "policy", "reward", "math_correct", "length",
                              "accuracy/math_verify", "format/boxed_present"]
    assert t.column("accuracy/math_verify").to_pylist() == t.column("math_correct").to_pylist() == [1, 0, 0, 1]
    assert t.column("format/boxed_present").to_pylist() == [1, 1, 0, 1]
    np.testing.assert_allclose(t.column("reward").to_numpy(), [1.5, 0.5, 0.5, 1.5])
    empty = scoring.score_responses(_prompts(), _responses([]), {"xml_soft": 1.0}, None, tpl.metrics)
    assert empty.num_rows == 0 and empty.column_names[-2:] == list(tpl.metrics)


def test_score_responses_errors():
    with pytest.raises(ValueError, match="valid rewards"):
        scoring.score_responses(_prompts(), _responses(), {"bogus": 1.0})
    with pytest.raises(ValueError, match="'bogus_metric'"):
        scoring.score_responses(_prompts(), _responses(), {"xml_soft": 1.0}, None, {"accuracy/x": "bogus_metric"})
    with pytest.raises(UserError, match="not in the prompts table.*another experiment's prompts"):
        scoring.score_responses(_prompts().slice(0, 1), _responses(), {"xml_soft": 1.0})
