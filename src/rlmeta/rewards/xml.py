"""Rewards for seed 003's XML chain-of-thought format on GSM8K (TRL-style, scaled to [0, 1]), and
GSM8K answer accuracy under the three extractions the evaluation reports."""
from __future__ import annotations

import re

from rlmeta.answers import last_number, number_key, numbers_equal, strict_gsm8k, to_float, xml_answer
from rlmeta.rewards import register

_STRICT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?", re.DOTALL)
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_INT = re.compile(r"-?\d+")


@register("xml_strict", "whole completion is <reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>")
def xml_strict(completion: str, reference=None, prompt=None) -> float:
    """1 when the whole completion is ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``."""
    return 1.0 if _STRICT.fullmatch(completion or "") else 0.0


@register("xml_soft", "a <reasoning>...</reasoning> block followed by an <answer>...</answer> block")
def xml_soft(completion: str, reference=None, prompt=None) -> float:
    """1 when a ``<reasoning>...</reasoning>`` block is followed by an ``<answer>...</answer>`` block."""
    return 1.0 if _SOFT.search(completion or "") else 0.0


@register("xml_count", "seed 003 count_xml partial credit for each tag line, x2, minus trailing text")
def xml_count(completion: str, reference=None, prompt=None) -> float:
    """Seed 003's ``count_xml`` partial credit, doubled to [0, 1]: 0.25 for each of
    ``<reasoning>\\n``, ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` occurring
    exactly once, minus 0.001 per character after ``</answer>`` (a final newline is free)."""
    text = completion or ""
    score = 0.25 * sum(text.count(t) == 1 for t in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"))
    if "</answer>" in text:
        tail = text.rsplit("</answer>", 1)[1]
        score -= 0.001 * len(tail[1:] if tail.startswith("\n") else tail)
    return min(1.0, max(0.0, score))


@register("integer_answer", "the <answer> block is an integer")
def integer_answer(completion: str, reference=None, prompt=None) -> float:
    """1 when the ``<answer>`` block holds an integer (seed 003's ``int_reward_func``)."""
    ans = xml_answer(completion or "")
    return 1.0 if ans is not None and _INT.fullmatch(ans.replace(",", "")) else 0.0


@register("gsm8k_correct", "numeric equality of the <answer> (else last number) with the reference")
def gsm8k_correct(completion: str, reference=None, prompt=None) -> float:
    """1 when the answer equals the reference numerically: the ``<answer>`` block (or the last
    number in it), else the completion's last number."""
    if reference is None:
        return 0.0
    text = completion or ""
    ans = xml_answer(text)
    if ans is None:
        pred = last_number(text)
    else:
        pred = ans if to_float(ans) is not None else last_number(ans)
    return 1.0 if numbers_equal(pred, str(reference)) else 0.0


def _accuracy(pred: str | None, reference) -> float:
    return 1.0 if reference is not None and numbers_equal(pred, str(reference)) else 0.0


@register("gsm8k_strict", "accuracy: the number after '####' equals the reference (lm-evaluation-harness strict-match)",
          answer=lambda c: number_key(strict_gsm8k(c or "")))
def gsm8k_strict(completion: str, reference=None, prompt=None) -> float:
    return _accuracy(strict_gsm8k(completion or ""), reference)


@register("gsm8k_flexible", "accuracy: the last number equals the reference (lm-evaluation-harness flexible-extract)",
          answer=lambda c: number_key(last_number(c or "")))
def gsm8k_flexible(completion: str, reference=None, prompt=None) -> float:
    return _accuracy(last_number(completion or ""), reference)


@register("gsm8k_xml", "accuracy: the last number inside <answer>...</answer> equals the reference",
          answer=lambda c: number_key(_xml_number(c)))
def gsm8k_xml(completion: str, reference=None, prompt=None) -> float:
    return _accuracy(_xml_number(completion), reference)


def _xml_number(completion: str | None) -> str | None:
    ans = xml_answer(completion or "")
    return None if ans is None else last_number(ans)
