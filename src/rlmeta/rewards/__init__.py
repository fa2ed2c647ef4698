"""Reward registry and scoring of one completion.

Each reward is ``fn(completion, reference=None, prompt=None, **params) -> float`` in [0, 1];
an experiment's total is the weighted sum ``sum(weight * reward)`` (config ``rewards``), with
per-reward keyword arguments from config ``reward_params``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rlmeta.rewards.mathverify import math_correct, math_verify_batch
from rlmeta.rewards.text import coherence, length, sections
from rlmeta.rewards.xml import gsm8k_correct, integer_answer, xml_count, xml_soft, xml_strict


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its function, a one-line description and its range."""

    name: str
    fn: Callable[..., float]
    description: str
    range: tuple[float, float] = (0.0, 1.0)


REGISTRY: dict[str, RewardSpec] = {
    s.name: s
    for s in [
        RewardSpec("sections", sections, "share of the five inner-scientist section headers present (optional order bonus)"),
        RewardSpec("length", length, "1 inside [min_words, max_words] (40..200), linear decay over `margin` words outside"),
        RewardSpec("coherence", coherence, "distinct-word ratio x (1 - repeated n-gram share), scaled down for very short text"),
        RewardSpec("xml_strict", xml_strict, "whole completion is <reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>"),
        RewardSpec("xml_soft", xml_soft, "a <reasoning>...</reasoning> block followed by an <answer>...</answer> block"),
        RewardSpec("xml_count", xml_count, "seed 003 count_xml partial credit for each tag line, x2, minus trailing text"),
        RewardSpec("integer_answer", integer_answer, "the <answer> block is an integer"),
        RewardSpec("gsm8k_correct", gsm8k_correct, "numeric equality of the <answer> (else last number) with the reference"),
        RewardSpec("math_correct", math_correct, "math-verify equivalence of the last \\boxed{} with the reference"),
    ]
}


def unknown_rewards(names) -> None:
    """Raise ValueError naming the unknown rewards in ``names`` and listing the valid ones."""
    bad = [n for n in names if n not in REGISTRY]
    if bad:
        raise ValueError(f"unknown reward(s) {', '.join(map(repr, bad))}; valid rewards: {', '.join(sorted(REGISTRY))}")


def score_completion(prompt_messages, completion: str, reference: str | None, rewards: dict[str, float],
                     params: dict | None = None) -> tuple[float, dict[str, float]]:
    """(weighted total, unweighted component values in ``rewards`` order) of one completion."""
    unknown_rewards(rewards)
    params = params or {}
    components = {
        name: float(REGISTRY[name].fn(completion, reference=reference, prompt=prompt_messages, **params.get(name, {})))
        for name in rewards
    }
    return sum(w * components[n] for n, w in rewards.items()), components


__all__ = ["REGISTRY", "RewardSpec", "score_completion", "unknown_rewards", "math_verify_batch"] + list(REGISTRY)
