"""Correctness rewards on real gold data (GSM8K test, MATH-500) and math-verify timeouts."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from rlmeta.answers import gsm8k_final_answer
from rlmeta.prompts import xml_cot_reference
from rlmeta.rewards import mathverify
from rlmeta.rewards.mathverify import math_verify_batch
from rlmeta.rewards.xml import gsm8k_correct

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "test.jsonl"
MATH500 = DATA / "math" / "math500_test.jsonl"


def _jsonl(path):
    if not path.exists():
        pytest.skip(f"{path} not found (shared data absent)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gsm8k_gold_xml_completions_are_correct():
    rows = _jsonl(GSM8K)
    refs = [gsm8k_final_answer(r["answer"]) for r in rows]
    comps = [xml_cot_reference({"solution": r["answer"], "answer": a}) for r, a in zip(rows, refs)]
    assert len(rows) == 1319 and all(refs)
    assert all(gsm8k_correct(c, reference=a) == 1.0 for c, a in zip(comps, refs))
    shifted = [gsm8k_correct(c, reference=a) for c, a in zip(comps, refs[1:] + refs[:1])]
    assert sum(shifted) / len(shifted) < 0.05


def test_math500_gold_solutions_verify():
    rows = _jsonl(MATH500)
    sols, answers = [r["solution"] for r in rows], [r["answer"] for r in rows]
    scores = math_verify_batch(list(zip(sols, answers)), workers=2, timeout_s=5)
    n = 150  # unequal pairs cost ~10x more sympy time; a sample keeps the file well under 60 s
    shifted = math_verify_batch(list(zip(sols[:n], answers[1:n + 1])), workers=2, timeout_s=5)
    assert sum(scores) / len(scores) >= 0.99
    assert sum(shifted) / len(shifted) < 0.05


def test_pathological_expression_times_out_to_zero():
    t0 = time.monotonic()
    pairs = [("$\\boxed{9^{9^{9^{9}}}}$", "5"), ("$\\boxed{2}$", "2")]
    assert math_verify_batch(pairs, workers=1, timeout_s=0.5) == [0.0, 1.0]
    assert time.monotonic() - t0 < 10


def _stuck_or_crash(completion, reference):
    if completion == "hang":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # defeat the soft alarm: only a kill helps
        time.sleep(60)
    if completion == "crash":
        os._exit(3)
    return 1.0


def test_hung_and_crashed_workers_are_replaced(monkeypatch):
    monkeypatch.setattr(mathverify, "_score_pair", _stuck_or_crash)  # fork children inherit it
    t0 = time.monotonic()
    out = math_verify_batch([("ok", "1"), ("hang", "1"), ("crash", "1"), ("ok", "1")], workers=2,
                            timeout_s=0.3, context="fork")
    assert out == [1.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - t0 < 10


def test_inline_and_empty():
    assert math_verify_batch([], workers=2) == []
    assert math_verify_batch([("$\\boxed{4}$", "4"), ("", "4")], workers=0) == [1.0, 0.0]


def test_spawn_context_works():
    assert math_verify_batch([("$\\boxed{4}$", "4"), ("$\\boxed{3}$", "4")], workers=1, context="spawn") == [1.0, 0.0]


def _broken(*args):
    raise ImportError("math-verify is broken")


def test_workers_that_cannot_start_raise(monkeypatch):
    monkeypatch.setattr(mathverify, "_verify", _broken)  # the warm-up fails in every forked worker
    with pytest.raises(RuntimeError, match="failing to start"):
        math_verify_batch([("$\\boxed{4}$", "4")], workers=1, context="fork")
