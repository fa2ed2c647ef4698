"""Hand-written cases for every registered reward and the registry."""
import pytest

from rlmeta.prompts import SECTIONS
from rlmeta.rewards import REGISTRY, score_completion, unknown_rewards
from rlmeta.rewards.text import coherence, length, sections
from rlmeta.rewards.xml import gsm8k_correct, integer_answer, xml_count, xml_soft, xml_strict
from rlmeta.rewards.mathverify import math_correct

GOOD_XML = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
FULL = "\n".join(f"{h} some words about it" for h in SECTIONS)
DEGENERATE = "the " * 120
EDGE = ["", "   \n\t ", DEGENERATE]


def test_registry_complete_and_ranges():
    assert set(REGISTRY) == {"sections", "length", "coherence", "xml_strict", "xml_soft", "xml_count",
                             "integer_answer", "gsm8k_correct", "math_correct"}
    for spec in REGISTRY.values():
        assert spec.description and spec.range == (0.0, 1.0)
        for text in EDGE + [GOOD_XML, FULL]:
            assert 0.0 <= spec.fn(text, reference="4") <= 1.0


@pytest.mark.parametrize("name", ["sections", "xml_strict", "xml_soft", "xml_count", "integer_answer",
                                  "gsm8k_correct", "math_correct", "length", "coherence"])
def test_empty_and_whitespace_score_zero(name):
    for text in ["", "   \n\t "]:
        assert REGISTRY[name].fn(text, reference="4") == 0.0


def test_unknown_rewards_lists_valid_names():
    unknown_rewards(["sections", "length"])
    with pytest.raises(ValueError) as e:
        unknown_rewards(["sections", "bogus"])
    assert "bogus" in str(e.value) and all(n in str(e.value) for n in REGISTRY)
    with pytest.raises(ValueError):
        score_completion(None, "x", None, {"nope": 1.0})


def test_sections():
    assert sections(FULL) == 1.0
    assert sections("\n".join(f"{h} text" for h in SECTIONS[:2])) == pytest.approx(0.4)
    assert sections("**goal hypothesis (g):** x\nReward Model (θ): y") == pytest.approx(0.4)
    shuffled = "\n".join(f"{h} text" for h in reversed(SECTIONS))
    assert sections(shuffled) == 1.0
    assert sections(shuffled, order_weight=0.5) == pytest.approx(0.5 + 0.5 * 1 / 5)
    assert sections(FULL, order_weight=0.5) == 1.0
    assert sections(DEGENERATE) == 0.0


def test_length_window():
    words = lambda n: " ".join(["word"] * n)
    assert length(words(40)) == length(words(120)) == length(words(200)) == 1.0
    assert length(words(20)) == pytest.approx(0.5)
    assert length(words(220)) == pytest.approx(0.5)
    assert length(words(400)) == 0.0  # longer is not better
    assert length(words(5), min_words=1, max_words=10) == 1.0
    assert length(words(15), min_words=1, max_words=10, margin=10) == pytest.approx(0.5)


def test_coherence():
    natural = ("Scientists reported a new battery chemistry that stores twice the energy of lithium cells. "
               "If the results hold in larger trials, electric cars could travel much farther on one charge.")
    assert coherence(natural) > 0.8
    assert coherence(DEGENERATE) < 0.01
    assert coherence("cat dog bird " * 30) < 0.05  # repeated n-grams
    assert coherence("hello") < 0.2  # too short for full credit
    assert coherence("!!! ??? ...") == 0.0


def test_xml_formats():
    assert xml_strict(GOOD_XML) == xml_strict(GOOD_XML + "\n") == 1.0
    assert xml_strict("Sure! " + GOOD_XML) == 0.0
    assert xml_strict("<reasoning>2+2</reasoning><answer>4</answer>") == 0.0
    assert xml_soft("<reasoning>2+2</reasoning> <answer>4</answer>") == 1.0
    assert xml_soft("Sure! " + GOOD_XML) == 1.0
    assert xml_soft("<answer>4</answer>") == 0.0
    assert xml_soft(DEGENERATE) == xml_strict(DEGENERATE) == 0.0


def test_xml_count():
    assert xml_count(GOOD_XML) == xml_count(GOOD_XML + "\n") == 1.0
    assert xml_count("<reasoning>\nonly reasoning\n</reasoning>\n") == pytest.approx(0.5)
    assert xml_count(GOOD_XML + "\n" + "x" * 100) == pytest.approx(0.9)
    assert xml_count(DEGENERATE) == 0.0


def test_integer_answer():
    assert integer_answer(GOOD_XML) == 1.0
    assert integer_answer(GOOD_XML.replace("\n4\n", "\n-1,000\n")) == 1.0
    assert integer_answer(GOOD_XML.replace("\n4\n", "\n4.5\n")) == 0.0
    assert integer_answer("4") == 0.0  # no answer block


def test_gsm8k_correct():
    assert gsm8k_correct(GOOD_XML, reference="4") == 1.0
    assert gsm8k_correct(GOOD_XML, reference="5") == 0.0
    assert gsm8k_correct("<answer>$1,000.</answer>", reference="1000") == 1.0
    assert gsm8k_correct("<answer>18 dollars</answer>", reference="18") == 1.0
    assert gsm8k_correct("so she makes 9 * 2 = 18", reference="18") == 1.0  # last number fallback
    assert gsm8k_correct(GOOD_XML, reference=None) == 0.0
    assert gsm8k_correct(DEGENERATE, reference="4") == 0.0


def test_math_correct():
    assert math_correct("so the answer is $\\boxed{\\frac{1}{2}}$.", reference="\\frac12") == 1.0
    assert math_correct("$\\boxed{0.5}$", reference="\\frac{1}{2}") == 1.0
    assert math_correct("$\\boxed{3}$", reference="\\frac{1}{2}") == 0.0
    assert math_correct("the answer is 1/2", reference="\\frac{1}{2}") == 0.0  # needs \boxed
    assert math_correct(DEGENERATE, reference="2") == 0.0


def test_score_completion_weighted_total():
    rewards = {"xml_strict": 0.5, "gsm8k_correct": 2.0, "length": 0.1}
    total, comps = score_completion(None, GOOD_XML, "4", rewards, {"length": {"min_words": 1, "max_words": 20}})
    assert list(comps) == list(rewards)
    assert comps == {"xml_strict": 1.0, "gsm8k_correct": 1.0, "length": 1.0}
    assert total == pytest.approx(2.6)
