"""Final-answer extraction shared by data preparation, rewards and evaluation."""
from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
"""lm-evaluation-harness's GSM8K ``flexible-extract`` pattern (the last match is the answer)."""
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def clean_number(text: str) -> str:
    """Strip commas, ``$``, spaces and a trailing period: ``"$1,234."`` -> ``"1234"``."""
    text = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    return text.rstrip(".")


def gsm8k_final_answer(solution: str) -> str | None:
    """The answer after GSM8K's ``####`` marker, cleaned; None when there is no marker."""
    if "####" not in solution:
        return None
    tail = solution.split("####")[-1].strip()
    answer = clean_number(tail.splitlines()[0]) if tail else ""
    return answer or None


def last_number(text: str) -> str | None:
    """The last number in ``text``, cleaned: lm-evaluation-harness's GSM8K flexible extraction
    (``"The change is -$5."`` -> ``"-5"``), skipping matches that are only punctuation."""
    for a, b in reversed(_NUMBER.findall(text)):
        cleaned = clean_number(a or b)
        if to_float(cleaned) is not None:
            return cleaned
    return None


def strict_gsm8k(text: str) -> str | None:
    """GSM8K's strict extraction: the number right after ``####``."""
    m = re.search(r"####\s*(-?[\d,\$]*\.?\d+)", text)
    return clean_number(m.group(1)) if m else None


def xml_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped."""
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return blocks[-1].strip() if blocks else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}``, nested braces respected."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        m = re.findall(r"\\boxed ([^\s$]+)", text)  # "\boxed 5" without braces
        return m[-1] if m else None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def to_fraction(text: str | None) -> Fraction | None:
    """The exact value of a cleaned numeric string (``"1,000"``, ``"-2.50"``, ``"3/4"``); None otherwise."""
    if text is None:
        return None
    text = clean_number(text)
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def to_float(text: str | None) -> float | None:
    """Parse a cleaned numeric string (also ``3/4``); None when it is not a number."""
    value = to_fraction(text)
    return None if value is None else float(value)


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact numeric equality of two answers (``"1,000"`` == ``"1000.0"``, ``"1000001"`` != ``"1000000"``).

    Rationals, not floats: GSM8K answers reach 10^7 and a relative tolerance would accept neighbours."""
    fa, fb = to_fraction(a), to_fraction(b)
    return fa is not None and fb is not None and fa == fb


def number_key(text: str | None) -> str | None:
    """A numeric answer as a voting key: its exact value (``"1,000"``, ``"1000.0"`` -> ``"1000"``), else the
    cleaned text; None for no answer."""
    if text is None:
        return None
    value = to_fraction(clean_number(text))
    return str(value) if value is not None else clean_number(text) or None


def boxed_key(text: str) -> str | None:
    """The last ``\\boxed{}`` of a completion as a voting key: without spaces and ``\\left``/``\\right``, and
    ``\\dfrac``/``\\tfrac`` as ``\\frac``. (Symbolic equivalence is math-verify's job in the accuracy; votes
    group by this text.)"""
    box = last_boxed(text or "")
    if box is None:
        return None
    key = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", re.sub(r"\\[dt]frac", r"\\frac", box))
    return re.sub(r"\s+", "", key) or None
