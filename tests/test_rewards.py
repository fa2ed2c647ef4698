"""Hand-written cases for every registered reward and the registry."""
import numpy as np
import pytest

from rlmeta.prompts import SECTIONS, TEMPLATES
from rlmeta.rewards import REGISTRY, RewardSpec, register, unknown_rewards
from rlmeta.rewards.mathverify import boxed_present, math_correct, verify_one
from rlmeta.rewards.text import all_sections, coherence, length, sections
from rlmeta.rewards.xml import (
    gsm8k_correct,
    gsm8k_flexible,
    gsm8k_strict,
    gsm8k_xml,
    integer_answer,
    xml_count,
    xml_soft,
    xml_strict,
)
from rlmeta.scoring import score
from rlmeta.testing.rewards import registered

GOOD_XML = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>"
FULL = "\n".join(f"{h} some words about it" for h in SECTIONS)
DEGENERATE = "the " * 120
EDGE = ["", "   \n\t ", DEGENERATE]


BUILT_IN = {"sections", "length", "coherence", "all_sections", "xml_strict", "xml_soft", "xml_count", "integer_answer",
            "gsm8k_correct", "gsm8k_strict", "gsm8k_flexible", "gsm8k_xml", "math_correct", "boxed_present",
            "rg_correct", "rg_format"}
INLINE = {"math_correct": {"workers": 0}}  # math-verify in this process (the worker pool is tested below)


def test_registry_complete_and_ranges():
    assert set(REGISTRY) == BUILT_IN
    assert [n for n, spec in REGISTRY.items() if spec.batched] == ["math_correct"]
    texts = EDGE + [GOOD_XML, FULL, "$\\boxed{4}$", "#### 4"]
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.description and spec.range == (0.0, 1.0)
        scores = spec.score(texts, ["4"] * len(texts), None, INLINE.get(name))
        assert scores.shape == (len(texts),) and np.all((scores >= 0.0) & (scores <= 1.0)), (name, scores)


def test_every_template_names_registered_scorers():
    for tpl in TEMPLATES.values():
        assert set(tpl.default_rewards) | set(tpl.metrics.values()) <= BUILT_IN
        assert tpl.primary_accuracy is None or tpl.primary_accuracy in tpl.metrics


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_empty_and_whitespace_score_zero(name):
    assert REGISTRY[name].score(["", "   \n\t "], ["4", "4"], None, INLINE.get(name)).tolist() == [0.0, 0.0]


def test_unknown_rewards_lists_valid_names():
    unknown_rewards(["sections", "length"])
    with pytest.raises(ValueError) as e:
        unknown_rewards(["sections", "bogus"])
    assert "bogus" in str(e.value) and all(n in str(e.value) for n in REGISTRY)
    with pytest.raises(ValueError, match="'nope'"):
        score(["x"], None, None, {"nope": 1.0})


def test_check_params_names_the_parameter_and_lists_the_real_ones():
    REGISTRY["length"].check_params({"min_words": 10, "max_words": 50.0, "margin": 5})  # a whole float is an int
    REGISTRY["sections"].check_params({"order_weight": 1})  # an int where a float is expected
    REGISTRY["math_correct"].check_params({"timeout_s": 3, "workers": 0})
    REGISTRY["xml_strict"].check_params({})
    with pytest.raises(ValueError) as e:
        REGISTRY["length"].check_params({"min_word": 10})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("reward_params.min_word: reward 'length' has no parameter 'min_word'")
    assert "min_words (default 40), max_words (default 200), margin (default 40)" in msg
    with pytest.raises(ValueError, match=r"^reward_params\.x: reward 'xml_strict' has no parameter 'x'; "
                                         r"its parameters: none$"):
        REGISTRY["xml_strict"].check_params({"x": 1})
    for bad in ("many", 2.5, True, None):
        with pytest.raises(ValueError) as e:
            REGISTRY["length"].check_params({"margin": bad}, where="experiments.e.reward_params.length")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"experiments.e.reward_params.length.margin is {bad!r} ")
        assert "reward 'length' expects int like its default 40" in msg
    with pytest.raises(ValueError, match=r"timeout_s is 'fast' \(str\); reward 'math_correct' expects float"):
        REGISTRY["math_correct"].check_params({"timeout_s": "fast"})


def test_register_refuses_kwargs_and_parameters_without_defaults():
    def loose(completion, reference=None, prompt=None, **kwargs):
        return 1.0

    def required(completion, reference=None, prompt=None, *, scale):
        return scale

    for fn, what in ((loose, "'kwargs' must be a keyword with a default"), (required, "'scale' must be")):
        with pytest.raises(TypeError, match=what), registered("bad_reward", fn):
            pass
        assert "bad_reward" not in REGISTRY
    with pytest.raises(ValueError, match="registered twice"):
        register("length", "another length")(loose)
    assert REGISTRY["length"].fn is length


def test_reward_spec_score_on_a_batch():
    texts = ["a" * 5, "abc", ""]

    def share(completion, reference=None, prompt=None, letter: str = "a"):
        return completion.count(letter) / max(1, len(completion)) if prompt is None or prompt == "p" else 0.5

    with registered("toy_share", share, "share of one letter") as name:
        spec = REGISTRY[name]
        assert isinstance(spec, RewardSpec) and not spec.batched and list(spec.params) == ["letter"]
        out = spec.score(texts)
        assert out.dtype == np.float64 and out.tolist() == [1.0, 1 / 3, 0.0]
        assert spec.score(texts, None, ["p", "q", "p"], {"letter": "b"}).tolist() == [0.0, 0.5, 0.0]
        with pytest.raises(TypeError):
            spec.score(texts, params={"colour": "b"})  # check_params is the place for a friendly error
    assert name not in REGISTRY

    calls = []

    def batched(completions, references, prompts=None, bonus: float = 0.0):
        calls.append((list(completions), list(references), list(prompts)))
        return [float(c == r) + bonus for c, r in zip(completions, references)]

    with registered("toy_equal", batched, batched=True):
        out = REGISTRY["toy_equal"].score(["1", "2", "3"], ["1", "0", "3"], params={"bonus": 0.25})
    assert out.tolist() == [1.25, 0.25, 1.25]
    assert calls == [(["1", "2", "3"], ["1", "0", "3"], [None, None, None])]  # one call for the whole batch


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


MATH_CASES = [  # (completion, reference, math-verify equal)
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac12", 1.0),
    ("$\\boxed{0.5}$", "\\frac{1}{2}", 1.0),
    ("$\\boxed{3}$", "\\frac{1}{2}", 0.0),
    ("the answer is 1/2", "\\frac{1}{2}", 0.0),  # needs \boxed
    (DEGENERATE, "2", 0.0),
    ("$\\boxed{2}$", None, 0.0),  # no reference
]


def test_math_correct_single_process():
    for completion, reference, expected in MATH_CASES:
        assert verify_one(completion, reference) == expected, completion
    assert math_correct(*zip(*[(c, r) for c, r, _ in MATH_CASES]), workers=0) == [e for *_, e in MATH_CASES]


@pytest.mark.slow
def test_math_correct_batched_in_worker_processes():
    completions, references, expected = map(list, zip(*MATH_CASES))
    assert math_correct(completions, references, workers=2, timeout_s=5.0) == expected
    assert REGISTRY["math_correct"].score(completions, references).tolist() == expected  # default: 2 workers


def test_boxed_present():
    assert boxed_present("so $\\boxed{x + 1}$") == boxed_present("\\fbox{3}") == boxed_present("\\boxed 5") == 1.0
    assert boxed_present("the answer is 5") == boxed_present("\\boxed{unclosed") == 0.0


def test_all_sections():
    assert all_sections(FULL) == 1.0
    assert all_sections("\n".join(f"{h} text" for h in reversed(SECTIONS))) == 1.0  # order does not matter
    assert all_sections("\n".join(f"{h} text" for h in SECTIONS[:4])) == 0.0  # four of five is not the format


def test_gsm8k_accuracies_under_the_three_extractions():
    text = "<reasoning>\n3 + 4 = 7, minus $2.\n</reasoning>\n<answer>\nShe has 5 apples\n</answer>\n#### 6"
    assert (gsm8k_strict(text, "6"), gsm8k_flexible(text, "6"), gsm8k_xml(text, "6")) == (1.0, 1.0, 0.0)
    assert (gsm8k_strict(text, "5"), gsm8k_flexible(text, "5"), gsm8k_xml(text, "5")) == (0.0, 0.0, 1.0)
    assert gsm8k_strict("#### 1,000", "1000") == gsm8k_strict("####$1,000.50", "1000.5") == 1.0
    assert gsm8k_strict("the answer is 7", "7") == 0.0  # strict needs the #### marker
    assert gsm8k_flexible("The change is -$5.", "-5") == 1.0  # lm-eval's flexible-extract
    assert gsm8k_flexible("1000001 apples", "1000000") == 0.0  # exact, no tolerance
    assert gsm8k_xml("<answer>7</answer> then 8", "7") == 1.0 and gsm8k_xml("7", "7") == 0.0
    for fn in (gsm8k_strict, gsm8k_flexible, gsm8k_xml):
        assert fn(GOOD_XML + "\n#### 4", None) == 0.0


def test_score_weighted_total():
    rewards = {"xml_strict": 0.5, "gsm8k_correct": 2.0, "length": 0.1}
    s = score([GOOD_XML, "no"], ["4", "4"], None, rewards, {"length": {"min_words": 1, "max_words": 20}})
    assert list(s.components) == list(rewards) and s.metrics == {}
    assert {n: v.tolist() for n, v in s.components.items()} == {"xml_strict": [1.0, 0.0], "gsm8k_correct": [1.0, 0.0],
                                                                 "length": [1.0, 1.0]}
    assert s.total.tolist() == pytest.approx([2.6, 0.1])
