"""Prompt templates, reference completions, the prompts table, and the answer extraction they are graded by."""
import pyarrow as pa
import pytest

from rlmeta import prompts
from rlmeta.answers import last_number, numbers_equal, strict_gsm8k, to_fraction
from rlmeta.cli import main
from rlmeta.io import read_table
from rlmeta.prompts import SECTIONS, TEMPLATES, build_prompts, reference_completion
from rlmeta.rewards import REGISTRY
from rlmeta.rewards.text import sections as sections_reward
from rlmeta.scoring import score
from rlmeta.tables import HEADLINES, PROBLEMS, PROMPTS


def headlines(n=40):
    return pa.Table.from_pylist(
        [{"headline_id": f"h{i:03d}", "feed": "f", "title": f"Storm number {i} hits coastal towns",
          "link": None, "summary": f"<p>Officials &amp; residents prepare as storm {i} nears the coast.</p>",
          "published": None, "fetched_at": None} for i in range(n)],
        schema=HEADLINES,
    )


def problems(source, split_counts, subject=None):
    rows = []
    for split, n in split_counts.items():
        for i in range(n):
            sol = (f"She has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}" if source == "gsm8k"
                   else f"We get $x = \\boxed{{{i + 2}}}$.")
            rows.append({"problem_id": f"{source}-{subject}-{split}-{i}", "source": source, "split": split,
                         "subject": subject, "level": None, "question": f"What is {i} + 2?",
                         "solution": sol, "answer": str(i + 2)})
    return pa.Table.from_pylist(rows, schema=PROBLEMS)


GSM_ROW = problems("gsm8k", {"train": 1}).to_pylist()[0]
MATH_ROW = problems("math", {"support": 1}, "algebra").to_pylist()[0]
HEAD_ROW = headlines(1).to_pylist()[0]


def test_template_messages():
    for name, row in [("inner_scientist", HEAD_ROW), ("xml_cot", GSM_ROW), ("math_boxed", MATH_ROW)]:
        msgs = TEMPLATES[name](row)
        assert [m["role"] for m in msgs] == ["system", "user"] and all(m["content"] for m in msgs)
    user = TEMPLATES["inner_scientist"](HEAD_ROW)[1]["content"]
    assert "Storm number 0" in user and "Officials & residents" in user and "<p>" not in user
    assert [user.index(h) for h in SECTIONS] == sorted(user.index(h) for h in SECTIONS)
    assert "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>" in TEMPLATES["xml_cot"](GSM_ROW)[0]["content"]
    assert "\\boxed{}" in TEMPLATES["math_boxed"](MATH_ROW)[0]["content"]
    with pytest.raises(ValueError, match="valid templates"):
        prompts.get_template("nope")


def test_sections_constant_shared_with_reward():
    from rlmeta.rewards import text

    assert text.SECTIONS is SECTIONS and len(SECTIONS) == 5
    assert sections_reward("\n".join(SECTIONS)) == 1.0


def test_reference_completions_score_maximal():
    ref = reference_completion("xml_cot", GSM_ROW)
    assert "<<" not in ref and "####" not in ref
    weights = {n: 1 for n in ("xml_strict", "xml_soft", "xml_count", "integer_answer", "gsm8k_correct")}
    scored = score([ref], ["2"], None, weights, metrics=TEMPLATES["xml_cot"].metrics)
    assert scored.total.tolist() == [5.0] and all(v.tolist() == [1.0] for v in scored.components.values())
    # every accuracy and format rate but lm-eval's strict match, which needs the "####" line the XML format drops
    assert {k: v.tolist() for k, v in scored.metrics.items()} == {
        "accuracy/gsm8k_strict": [0.0], "accuracy/gsm8k_flexible": [1.0], "accuracy/gsm8k_xml": [1.0],
        "format/xml_strict": [1.0], "format/xml_soft": [1.0]}
    math_ref = reference_completion("math_boxed", MATH_ROW)
    assert REGISTRY["math_correct"].score([math_ref], ["2"]).tolist() == [1.0]
    math_scores = score([math_ref], ["2"], None, TEMPLATES["math_boxed"].default_rewards,
                        metrics=TEMPLATES["math_boxed"].metrics)
    assert math_scores.total.tolist() == [1.0]
    assert {k: v.tolist() for k, v in math_scores.metrics.items()} == {"accuracy/math_verify": [1.0],
                                                                       "format/boxed_present": [1.0]}
    refs = [reference_completion("inner_scientist", r) for r in headlines(5).to_pylist()]
    assert len(set(refs)) == 5  # headline-specific
    for r in refs + [reference_completion("inner_scientist", {"title": "Hi", "summary": None})]:
        assert sections_reward(r, order_weight=1.0) == 1.0 and REGISTRY["length"].fn(r) == 1.0
        assert REGISTRY["coherence"].fn(r) > 0.5


def test_headline_prompts_table():
    t = build_prompts("exp", "inner_scientist", headlines(), eval_fraction=0.25, seed=1)
    assert t.schema == PROMPTS and t.num_rows == 40
    rows = t.to_pylist()
    assert all(r["task"] == r["item_id"] and r["reference"] is None and r["reference_completion"] for r in rows)
    splits = [r["split"] for r in rows]
    assert 3 <= splits.count("eval") <= 20 and splits == sorted(splits, key=["train", "eval"].index)
    assert len({r["prompt_id"] for r in rows}) == 40
    # the split depends only on headline_id: another seed or subset keeps each headline's split
    other = build_prompts("exp2", "inner_scientist", headlines(20), seed=7).to_pylist()
    assert {r["item_id"]: r["split"] for r in other}.items() <= {r["item_id"]: r["split"] for r in rows}.items()


def test_gsm8k_and_math_splits_disjoint_and_capped():
    g = build_prompts("g", "xml_cot", problems("gsm8k", {"train": 30, "test": 10})).to_pylist()
    assert {r["split"] for r in g if "train" in r["item_id"]} == {"train"}
    assert {r["split"] for r in g if "test" in r["item_id"]} == {"eval"}
    assert {r["task"] for r in g} == {"gsm8k"} and all(r["reference"] for r in g)
    tables = [problems("math", {"support": 6, "query": 8, "heldout": 4}, "algebra"),
              problems("math", {"support": 3, "test": 5}, "geometry")]
    m = build_prompts("m", "math_boxed", tables, max_train=10, max_eval=4, seed=3).to_pylist()
    train = {r["item_id"] for r in m if r["split"] == "train"}
    evals = {r["item_id"] for r in m if r["split"] == "eval"}
    assert len(train) == 10 and len(evals) == 4 and not train & evals
    assert {r["task"] for r in m} <= {"algebra", "geometry"}
    assert all("-test-" in i or "-heldout-" in i for i in evals)
    # caps are deterministic and independent of input order
    again = build_prompts("m", "math_boxed", tables[::-1], max_train=10, max_eval=4, seed=3).to_pylist()
    assert again == m
    assert build_prompts("m", "math_boxed", tables, max_train=10, max_eval=4, seed=4).to_pylist() != m
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        build_prompts("m", "math_boxed", problems("math", {"validation": 1}, "algebra"))


def test_cli_byte_identical_reruns(tmp_path):
    from rlmeta.io import write_table

    src = tmp_path / "train.parquet"
    write_table(src, problems("gsm8k", {"train": 12, "test": 6}), PROBLEMS)
    outs = []
    for k in range(2):
        out = tmp_path / f"p{k}.parquet"
        assert main(["make-prompts", "--experiment", "g", "--template", "xml_cot",
                     "--inputs", str(src), "--out", str(out), "--seed", "5", "--max-train", "8"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    t = read_table(tmp_path / "p0.parquet", PROMPTS)
    assert t.num_rows == 14 and t.schema.equals(PROMPTS)
    assert build_prompts("g", "xml_cot", problems("gsm8k", {"train": 12, "test": 6}), seed=5,
                         max_train=8).equals(t)


# -- answer extraction and comparison (rlmeta.answers), which grades these templates' completions -----------

@pytest.mark.parametrize("a, b, equal", [
    ("1000001", "1000000", False),  # was equal under the old 1e-6 relative tolerance
    ("192000001", "192000000", False),
    ("1,000", "1000.0", True),
    ("$1,250", "1250", True),
    ("0.5", "1/2", True),
    ("-5", "-5.00", True),
    ("3", "-3", False),
    ("0.1", "0.10000001", False),
    ("abc", "abc", False),  # not numbers: never equal
    (None, "1", False),
])
def test_numbers_equal_is_exact(a, b, equal):
    assert numbers_equal(a, b) is equal
    assert numbers_equal(b, a) is equal


@pytest.mark.parametrize("text, number", [
    ("The change is -$5.", "-5"),  # was "5": the minus before the $ was lost
    ("She pays $1,250.50 in total.", "1250.50"),
    ("so 3 + 4 = 7", "7"),
    ("about 2,520,000 people", "2520000"),
    ("It costs $18. Then...", "18"),
    ("no digits here.", None),
    ("- . , $", None),
])
def test_last_number_is_flexible_extract(text, number):
    assert last_number(text) == number


def test_gsm8k_scorers_on_negative_and_large_answers():
    assert REGISTRY["gsm8k_flexible"].fn("The change is -$5.", reference="-5") == 1.0
    assert REGISTRY["gsm8k_flexible"].fn("The change is -$5.", reference="5") == 0.0
    assert strict_gsm8k("so #### 1,000,001") == "1000001"
    assert REGISTRY["gsm8k_strict"].fn("#### 1,000,001", reference="1000000") == 0.0
    assert REGISTRY["gsm8k_correct"].fn("<answer>\n1000001\n</answer>", reference="1000000") == 0.0
    assert REGISTRY["gsm8k_correct"].fn("<answer>\n1,000,000\n</answer>", reference="1000000") == 1.0
    assert to_fraction("1,000") == 1000 and to_fraction("1/0") is None
