"""Per-completion task metrics next to the rewards: accuracy under several extractions and
format adherence. Every function returns one float (0 or 1) per completion.

Which metrics apply depends on the prompt template (``METRICS``): GSM8K (``xml_cot``) gets
strict (``#### N``), flexible (last number) and XML ``<answer>`` accuracy; MATH
(``math_boxed``) gets math-verify accuracy of the last ``\\boxed{}``; headlines
(``inner_scientist``) get the all-sections format rate.
"""
from __future__ import annotations

from typing import Callable, Sequence

from rlmeta.answers import last_boxed, last_number, numbers_equal, strict_gsm8k, xml_answer
from rlmeta.rewards import math_verify_batch
from rlmeta.rewards.text import sections
from rlmeta.rewards.xml import xml_soft, xml_strict


def _xml_number(text: str) -> str | None:
    ans = xml_answer(text)
    return None if ans is None else last_number(ans)


GSM8K_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k_strict": strict_gsm8k,
    "gsm8k_flexible": last_number,
    "gsm8k_xml": _xml_number,
}
"""Accuracy name -> answer extraction from a completion (compared numerically to the reference)."""

FORMATS: dict[str, Callable[[str], bool]] = {
    "xml_strict": lambda c: xml_strict(c) == 1.0,
    "xml_soft": lambda c: xml_soft(c) == 1.0,
    "boxed_present": lambda c: last_boxed(c) is not None,
    "all_sections": lambda c: sections(c) == 1.0,
}
"""Format name -> predicate on a completion."""

METRICS = {
    "xml_cot": {"accuracy": ["gsm8k_strict", "gsm8k_flexible", "gsm8k_xml"], "format": ["xml_strict", "xml_soft"]},
    "math_boxed": {"accuracy": ["math_verify"], "format": ["boxed_present"]},
    "inner_scientist": {"accuracy": [], "format": ["all_sections"]},
}
"""Template -> the accuracy and format metrics that apply to it."""


def infer_template(system_message: str | None) -> str:
    """Guess the template from a prompt's system message (when none is given)."""
    text = system_message or ""
    if "<reasoning>" in text:
        return "xml_cot"
    if "\\boxed" in text:
        return "math_boxed"
    return "inner_scientist"


def gsm8k_accuracy(name: str, completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """1.0 where the ``name`` extraction equals the reference numerically."""
    extract = GSM8K_EXTRACTORS[name]
    return [float(ref is not None and numbers_equal(extract(c or ""), str(ref))) for c, ref in zip(completions, references)]


def math_accuracy(completions: Sequence[str], references: Sequence[str | None], workers: int = 2,
                  timeout_s: float = 5.0) -> list[float]:
    """math-verify equivalence of the last ``\\boxed{}`` with the reference (worker processes,
    ``timeout_s`` per pair; a timeout scores 0)."""
    return math_verify_batch(list(zip(completions, references)), workers=workers, timeout_s=timeout_s)


def format_rate(name: str, completions: Sequence[str]) -> list[float]:
    """1.0 where the completion satisfies format ``name``."""
    pred = FORMATS[name]
    return [float(pred(c or "")) for c in completions]


def completion_metrics(template: str, completions: Sequence[str], references: Sequence[str | None],
                       workers: int = 2, timeout_s: float = 5.0) -> dict[str, list[float]]:
    """Every metric of ``template`` per completion, keyed ``accuracy/<name>`` and ``format/<name>``."""
    spec = METRICS[template]
    out: dict[str, list[float]] = {}
    for name in spec["accuracy"]:
        vals = (math_accuracy(completions, references, workers, timeout_s) if name == "math_verify"
                else gsm8k_accuracy(name, completions, references))
        out[f"accuracy/{name}"] = vals
    for name in spec["format"]:
        out[f"format/{name}"] = format_rate(name, completions)
    return out
