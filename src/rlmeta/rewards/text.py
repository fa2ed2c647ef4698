"""Rewards for free text (seed 000's inner scientist): sections, length, coherence."""
from __future__ import annotations

import re

from rlmeta.prompts import SECTIONS
from rlmeta.rewards import register

_ALIASES = {"theta": "(?:theta|θ)", "pi_probe": r"(?:pi_probe|π_probe|pi-probe|π)"}


def _header_pattern(header: str) -> re.Pattern:
    """``Name (sym):`` matched case-insensitively, with optional markdown ``*`` and θ/π aliases."""
    m = re.fullmatch(r"(.+?)\s*(?:\((.+)\))?:", header)
    name, sym = m.group(1), m.group(2)
    pat = r"\s+".join(map(re.escape, name.split()))
    if sym:
        pat += r"\s*\(\s*" + _ALIASES.get(sym, re.escape(sym)) + r"\s*\)"
    return re.compile(pat + r"\s*\**\s*:", re.IGNORECASE)


_PATTERNS = [_header_pattern(h) for h in SECTIONS]


def _longest_increasing(xs: list[int]) -> int:
    best: list[int] = []
    for x in xs:
        i = next((j for j, b in enumerate(best) if b >= x), len(best))
        best[i:i + 1] = [x]
    return len(best)


@register("sections", "share of the five inner-scientist section headers present (optional order bonus)")
def sections(completion: str, reference=None, prompt=None, order_weight: float = 0.0) -> float:
    """Fraction of the five ``SECTIONS`` headers present; ``order_weight`` of the score
    goes instead to how many headers appear in the right order (longest ordered run / 5)."""
    found = [m.start() for p in _PATTERNS if (m := p.search(completion or ""))]
    present = len(found) / len(SECTIONS)
    ordered = _longest_increasing(found) / len(SECTIONS)
    return (1.0 - order_weight) * present + order_weight * ordered


@register("length", "1 inside [min_words, max_words] (40..200), linear decay over `margin` words outside")
def length(completion: str, reference=None, prompt=None, min_words: int = 40, max_words: int = 200,
           margin: int = 40) -> float:
    """1 for a word count in [min_words, max_words], falling linearly to 0 over ``margin``
    words outside the range (so neither empty nor rambling answers are rewarded)."""
    n = len((completion or "").split())
    gap = max(min_words - n, n - max_words, 0)
    return max(0.0, 1.0 - gap / max(margin, 1e-9))


_TOKEN = re.compile(r"\w+")


@register("coherence", "distinct-word ratio x (1 - repeated n-gram share), scaled down for very short text")
def coherence(completion: str, reference=None, prompt=None, ngram: int = 3, min_words: int = 10) -> float:
    """Distinct-word ratio x (1 - share of repeated ``ngram``-grams) x min(1, words/min_words).

    Empty or word-free text scores 0; "the the the ..." scores about 0; very short text is
    scaled down so a single word cannot earn full credit.
    """
    words = _TOKEN.findall((completion or "").lower())
    if not words:
        return 0.0
    distinct = len(set(words)) / len(words)
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    repeated = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    return distinct * (1.0 - repeated) * min(1.0, len(words) / min_words)


@register("all_sections", "1 when all five inner-scientist section headers are present (the headlines format rate)")
def all_sections(completion: str, reference=None, prompt=None) -> float:
    """1.0 when every section header is present, else 0.0."""
    return 1.0 if sections(completion) == 1.0 else 0.0
