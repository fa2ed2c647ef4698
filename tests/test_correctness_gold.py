"""Correctness rewards on real gold data (GSM8K, MATH-500) and math-verify timeouts."""
import json
import os
import signal
import time
from fractions import Fraction

import pytest

from rlmeta.answers import gsm8k_final_answer, numbers_equal
from rlmeta.prompts import xml_cot_reference
from rlmeta.rewards import REGISTRY, mathverify
from rlmeta.rewards.mathverify import math_verify_batch
from rlmeta.rewards.xml import gsm8k_correct


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gsm8k_gold_xml_completions_are_correct(shared_data):
    rows = _jsonl(shared_data / "gsm8k" / "test.jsonl")
    refs = [gsm8k_final_answer(r["answer"]) for r in rows]
    comps = [xml_cot_reference({"solution": r["answer"], "answer": a}) for r, a in zip(rows, refs)]
    assert len(rows) == 1319 and all(refs)
    assert all(gsm8k_correct(c, reference=a) == 1.0 for c, a in zip(comps, refs))
    shifted = [gsm8k_correct(c, reference=a) for c, a in zip(comps, refs[1:] + refs[:1])]
    assert sum(shifted) / len(shifted) < 0.05
    # the raw gold solutions ("... #### 72") pass lm-eval's strict and flexible extractions
    for name in ("gsm8k_strict", "gsm8k_flexible"):
        scores = REGISTRY[name].score([r["answer"] for r in rows], refs)
        assert scores.min() == 1.0, (name, [rows[i]["answer"][-40:] for i in (scores < 1).nonzero()[0][:5]])


def test_largest_gsm8k_answers_equal_only_themselves(shared_data):
    """GSM8K answers reach 1.9e8: a relative tolerance (the old 1e-6) took 192000000 and 192000001 for
    equal. Every large answer must equal itself in any spelling, and no other answer or neighbour."""
    answers = [gsm8k_final_answer(r["answer"]) for split in ("train", "test")
               for r in _jsonl(shared_data / "gsm8k" / f"{split}.jsonl")]
    assert len(answers) == 7473 + 1319 and all(answers)
    distinct = sorted(set(answers), key=Fraction)
    largest = distinct[-20:]
    assert Fraction(largest[-1]) == 192_000_000 and Fraction(largest[0]) >= 500_000, largest
    for a in largest:
        n = int(a)
        assert numbers_equal(a, a) and numbers_equal(f"{n:,}", a) and numbers_equal(f"${n:,}.00", a)
        others = [b for b in distinct if b != a] + [str(n - 1), str(n + 1), f"{n}.5", f"{n - 0.5}", f"{n * 10}"]
        assert not [b for b in others if numbers_equal(b, a) or numbers_equal(a, b)], a
        # and so does the reward that grades them
        assert gsm8k_correct(f"<answer>\n{n:,}\n</answer>", reference=a) == 1.0
        assert gsm8k_correct(f"<answer>\n{n + 1}\n</answer>", reference=a) == 0.0
        assert gsm8k_correct(f"so the total is {n - 1}.", reference=a) == 0.0


def test_math500_gold_solutions_verify(shared_data):
    rows = _jsonl(shared_data / "math" / "math500_test.jsonl")
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
