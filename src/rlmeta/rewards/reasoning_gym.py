"""Rewards for reasoning-gym tasks: each task's own verifier on the ``<answer>`` block, and the format.

The prompts' ``reference`` of a reasoning-gym row is JSON (``rlmeta.prompts.reasoning_gym_key``) with the
task, question, gold answer, the entry's metadata and the task's config; ``rg_correct`` rebuilds the
generator from the task and config (once per distinct pair) and calls its ``score_answer(answer, entry)``.
"""
from __future__ import annotations

import functools
import json
import re

from rlmeta.answers import xml_answer
from rlmeta.rewards import register

_FORMAT = re.compile(r"\s*<answer>[^<]*</answer>\s*")


@functools.cache
def _verifier(task: str, config: str):
    from rlmeta.data.reasoning_gym import generator

    return generator(task, json.loads(config), seed=0, size=1).score_answer


def rg_answer(completion: str | None) -> str | None:
    """The completion's final answer: the last ``<answer>...</answer>`` block, stripped."""
    return xml_answer(completion or "")


@register("rg_correct", "the reasoning-gym task's own score_answer on the last <answer>...</answer> block",
          answer=rg_answer)
def rg_correct(completion: str, reference=None, prompt=None, partial: bool = False) -> float:
    """1 when the task's ``score_answer(answer, entry)`` is 1, with the entry rebuilt from the reference JSON;
    0 without an ``<answer>`` block or a reference, or when the verifier fails. Many verifiers give partial
    credit (basic_arithmetic: ``len(gold) / len(answer)`` when the gold answer is inside a wrong one, so "11"
    for 1 scores 0.5): ``partial: true`` keeps it as the reward; the default (and the accuracy) counts only
    a full score."""
    answer = rg_answer(completion)
    if not reference or answer is None:
        return 0.0
    try:
        ref = json.loads(reference)
    except (TypeError, ValueError):
        ref = None
    if not isinstance(ref, dict) or "task" not in ref or "answer" not in ref:
        return 0.0  # not a reasoning-gym reference (rlmeta.prompts.reasoning_gym_key)
    entry = {"question": ref.get("question", ""), "answer": ref["answer"], "metadata": ref.get("metadata", {})}
    try:
        score = _verifier(ref["task"], json.dumps(ref.get("config", {}), sort_keys=True))(answer, entry)
    except Exception:  # a verifier that cannot parse the answer: wrong, not a crash of training
        return 0.0
    score = float(min(1.0, max(0.0, score or 0.0)))
    return score if partial else float(score >= 1.0)


@register("rg_format", "the completion is one <answer>...</answer> block (whitespace around it allowed)")
def rg_format(completion: str, reference=None, prompt=None) -> float:
    return 1.0 if _FORMAT.fullmatch(completion or "") else 0.0
