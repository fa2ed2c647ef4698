"""evaluate on fixture tables written with the real schemas (rlmeta.testing.fixtures): the summary
reads the accuracy/format columns the score step wrote; the CLI adds provenance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest

from rlmeta.cli import main
from rlmeta.evaluation.evaluate import evaluate
from rlmeta.prompts import TEMPLATES
from rlmeta.provenance import config_hash
from rlmeta.scoring import score_responses
from rlmeta.settings import Experiment
from rlmeta.tables import PROMPTS, RESPONSES, rewards_schema
from rlmeta.testing.fixtures import evaluate_args, prompt_rows, response_rows, write_rl_fixture


def scored_tables(template: str, prompts: list[dict], comps: dict[str, dict], params: dict | None = None):
    """(prompts, responses, rewards) tables of hand-made completions, scored as the score step does: the
    template's default rewards and its task metrics (the accuracy/format columns evaluate reads)."""
    ptab = pa.Table.from_pylist(prompts, schema=PROMPTS)
    rewards, metrics = TEMPLATES[template].default_rewards, TEMPLATES[template].metrics
    resp = {pol: pa.Table.from_pylist(response_rows(pol, c), schema=RESPONSES) for pol, c in comps.items()}
    rew = {pol: score_responses(ptab, r, rewards, params, metrics=metrics) for pol, r in resp.items()}
    for t in rew.values():
        assert t.schema.equals(rewards_schema(list(rewards), list(metrics)))
    return ptab, resp, rew


def test_gsm8k_accuracies_on_hand_made_completions():
    prompts = prompt_rows("g", "xml_cot", [("q0", "42"), ("q1", "1,000")])
    base = {("p000", 0): "The answer is 42.",                       # flexible only
            ("p000", 1): "#### 42",                                 # strict and flexible
            ("p001", 0): "#### 1000 and then 7",                    # strict only
            ("p001", 1): "<answer>1000</answer>"}                   # flexible and xml
    trained = {("p000", 0): "<reasoning>\n6*7\n</reasoning>\n<answer>\n42\n</answer>",  # flexible, xml, xml_strict
               ("p000", 1): "<reasoning>\n6*7\n</reasoning>\n<answer>\n42\n</answer>",
               ("p001", 0): "<reasoning>\nx\n</reasoning>\n<answer>\n1,000\n</answer>\n#### 1000",  # all three
               ("p001", 1): "<answer>\n999\n</answer>"}            # none
    tables = scored_tables("xml_cot", prompts, {"base": base, "trained": trained})
    s = evaluate(*tables, template="xml_cot", weights=TEMPLATES["xml_cot"].default_rewards, resamples=500, seed=0)
    assert s["template"] == "xml_cot" and s["primary_accuracy"] == "accuracy/gsm8k_xml"
    acc = s["accuracy"]
    assert set(acc) == {"gsm8k_strict", "gsm8k_flexible", "gsm8k_xml"}
    assert (acc["gsm8k_strict"]["base"], acc["gsm8k_strict"]["trained"]) == (pytest.approx(0.5), pytest.approx(0.25))
    flexible = acc["gsm8k_flexible"]
    assert (flexible["base"], flexible["trained"]) == (pytest.approx(0.75), pytest.approx(0.75))
    assert (acc["gsm8k_xml"]["base"], acc["gsm8k_xml"]["trained"]) == (pytest.approx(0.25), pytest.approx(0.75))
    assert s["format"]["xml_strict"]["base"] == 0.0 and s["format"]["xml_strict"]["trained"] == pytest.approx(0.5)
    assert s["format"]["stopped"]["base"] == 1.0
    assert s["reward"]["n_prompts"] == 2 and s["reward"]["n_samples"] == 4
    assert set(s["format"]) == {"xml_strict", "xml_soft", "stopped"}
    assert set(s["components"]) == set(TEMPLATES["xml_cot"].default_rewards)
    assert s["components"]["gsm8k_correct"]["weight"] == 1.0 and s["components"]["xml_strict"]["weight"] == 0.5
    assert s["length"]["base"] == pytest.approx((4 + 2 + 5 + 1) / 4)


def test_math_verify_accuracy_and_per_subject():
    prompts = prompt_rows("m", "math_boxed", [("a", "\\frac{1}{2}"), ("b", "3")], tasks=["algebra", "geometry"])
    base = {("p000", 0): "$\\boxed{0.7}$", ("p001", 0): "no box, 3"}
    trained = {("p000", 0): "so $\\boxed{\\frac{2}{4}}$", ("p001", 0): "$\\boxed{3}$"}
    # math-verify in 2 worker processes with a timeout, as the score step runs it
    tables = scored_tables("math_boxed", prompts, {"base": base, "trained": trained},
                           {"math_correct": {"workers": 2, "timeout_s": 5.0}})
    s = evaluate(*tables, template="math_boxed", resamples=200, seed=0)
    assert s["primary_accuracy"] == "accuracy/math_verify" and set(s["accuracy"]) == {"math_verify"}
    assert s["accuracy"]["math_verify"]["base"] == 0.0 and s["accuracy"]["math_verify"]["trained"] == 1.0
    assert s["format"]["boxed_present"]["base"] == 0.5 and s["format"]["boxed_present"]["trained"] == 1.0
    assert s["per_subject"]["algebra"]["accuracy_trained"] == 1.0 and s["per_subject"]["geometry"]["n_prompts"] == 1
    assert s["per_subject"]["geometry"]["accuracy_base"] == 0.0 and s["per_subject"]["algebra"]["reward_base"] == 0.0
    assert s["reward"]["diff_mean"] == pytest.approx(1.0) and s["reward"]["diff_ci95"] == [1.0, 1.0]


def test_accuracy_comes_from_the_rewards_table():
    """evaluate reports the metric columns as the score step wrote them; it does not score again."""
    prompts = prompt_rows("m", "math_boxed", [("a", "3"), ("b", "3")], tasks=["algebra", "algebra"])
    comps = {"base": {("p000", 0): "$\\boxed{3}$", ("p001", 0): "$\\boxed{3}$"},
             "trained": {("p000", 0): "$\\boxed{3}$", ("p001", 0): "$\\boxed{3}$"}}
    ptab, resp, rew = scored_tables("math_boxed", prompts, comps)
    col = "accuracy/math_verify"
    assert rew["base"].column(col).to_pylist() == [1.0, 1.0]
    rew["base"] = rew["base"].set_column(rew["base"].schema.get_field_index(col), col, pa.array([0.0, 1.0]))
    s = evaluate(ptab, resp, rew, template="math_boxed", resamples=200, seed=0)
    assert s["accuracy"]["math_verify"]["base"] == 0.5 and s["accuracy"]["math_verify"]["trained"] == 1.0
    assert s["reward"]["diff_mean"] == 0.0  # the reward column is untouched


def _cli_args(d: Path, config: str, out: Path, labels=("seed1234",)) -> list[str]:
    return ["evaluate", "--experiment", d.name, "--config", config, *evaluate_args(d, labels), "--seed", "5",
            "--out", str(out)]


def test_cli_writes_summary_with_provenance(tmp_path):
    res = tmp_path / "results"
    fx = write_rl_fixture(res, "h", "inner_scientist", n_prompts=6, samples=2)
    cfg = Experiment.model_validate({**fx["config"].model_dump(mode="json"), "eval": {"bootstrap": 300}})
    out = res / "h" / "eval" / "summary.json"
    d = res / "h"
    assert main(_cli_args(d, json.dumps(cfg.model_dump(mode="json")), out)) == 0
    s = json.loads(out.read_text())
    assert s["experiment"] == "h" and s["template"] == "inner_scientist" and s["primary_accuracy"] is None
    assert s["checkpoint"]["sha256"] == hashlib.sha256(b"fake weights h/seed1234").hexdigest()
    assert s["checkpoints"] == {"seed1234": s["checkpoint"]}
    assert "base_checkpoint" not in s
    assert s["config_hash"] == config_hash(cfg.model_dump(mode="json")) == hashlib.sha256(
        json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    r = s["reward"]
    assert set(r) == {"base_mean", "trained_mean", "diff_mean", "diff_ci95", "n_prompts", "n_samples"}
    assert r["diff_ci95"][0] <= r["diff_mean"] <= r["diff_ci95"][1] and r["n_prompts"] == 6 and r["n_samples"] == 12
    assert r["diff_mean"] == pytest.approx(r["trained_mean"] - r["base_mean"])
    assert s["components"]["sections"]["weight"] == 0.5
    assert s["accuracy"] == {} and set(s["format"]) == {"all_sections", "stopped"}
    assert set(s["length"]) >= {"base", "trained"}
    assert s["bootstrap"] == {"resamples": 300, "seed": 5, "level": 0.95, "unit": "prompt"}
    first = out.read_bytes()
    # the same experiment given as a file with only the keys that differ from the defaults: same hash, same bytes
    short = tmp_path / "h.json"
    short.write_text(cfg.model_dump_json(exclude_defaults=True))
    assert main(_cli_args(d, str(short), out)) == 0
    assert out.read_bytes() == first  # deterministic


def test_cli_records_the_base_checkpoint(tmp_path):
    res = tmp_path / "results"
    fx = write_rl_fixture(res, "h", "inner_scientist", n_prompts=4, samples=1)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    out = tmp_path / "summary.json"
    assert main(_cli_args(res / "h", fx["config"].model_dump_json(), out)
                + ["--base-checkpoint", str(base)]) == 0
    s = json.loads(out.read_text())
    assert s["base_checkpoint"] == {"path": str(base), "sha256": hashlib.sha256(b"base weights").hexdigest()}
    assert s["bootstrap"]["resamples"] == fx["config"].eval.bootstrap == 2000


def test_cli_rejects_a_bad_config(tmp_path, capsys):
    res = tmp_path / "results"
    fx = write_rl_fixture(res, "h", "inner_scientist", n_prompts=2, samples=1)
    bad = {**fx["config"].model_dump(mode="json"), "eval": {"bootstrapp": 300}}
    with pytest.raises(SystemExit) as e:
        main(_cli_args(res / "h", json.dumps(bad), tmp_path / "summary.json"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'eval.bootstrapp'" in err and "did you mean 'bootstrap'" in err
    assert not (tmp_path / "summary.json").exists()


# -- pass@k, maj@k, several seeds -----------------------------------------------------------------------------------

@pytest.mark.parametrize("c", range(5))
@pytest.mark.parametrize("k", range(1, 5))
def test_pass_at_k_is_the_closed_form(c, k):
    """n = 4: pass@k = 1 - C(4-c, k) / C(4, k) (Chen et al. 2021, eq. 1)."""
    from math import comb

    from rlmeta.evaluation.sampling import pass_at_k

    assert pass_at_k(4, c, k) == pytest.approx(1 - comb(4 - c, k) / comb(4, k), abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    from rlmeta.evaluation.sampling import pass_at_k

    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_majority_vote_ties_go_to_the_first_answer_seen():
    from rlmeta.evaluation.sampling import majority_correct

    assert majority_correct(["7", "8", "8", "7"], [1, 0, 0, 1], k=4) == 1.0  # 2-2 tie: "7" came first
    assert majority_correct(["8", "7", "7", "8"], [0, 1, 1, 0], k=4) == 0.0
    assert majority_correct(["8", "7", "7", "8"], [0, 1, 1, 0], k=3) == 1.0  # first 3: "7" twice
    assert majority_correct([None, None, "3"], [0, 0, 1], k=3) == 1.0  # no answer: no vote
    assert majority_correct([None, None], [0, 0], k=2) == 0.0


def test_across_runs_on_known_numbers():
    from scipy import stats

    from rlmeta.evaluation.stats import across_runs

    x = [0.10, 0.20, 0.30, 0.40, 1.00]
    a = across_runs(dict(zip("abcde", x)), resamples=500, seed=0)
    assert a["n_seeds"] == 5 and a["mean"] == pytest.approx(0.4)
    sem = stats.sem(x)
    half = stats.t.ppf(0.975, 4) * sem
    assert a["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert a["iqm"] == pytest.approx(0.3)  # trims 0.10 and 1.00 (25% each side of 5 -> 1 each)
    assert a["iqm_ci95"][0] <= a["iqm"] <= a["iqm_ci95"][1]
    one = across_runs({"s": 0.5})
    assert one["ci95"] is None and one["iqm_ci95"] is None and one["mean"] == 0.5


def test_gsm8k_pass_and_majority_at_k_from_answers():
    """4 samples per prompt: pass@k from the correct count, maj@k from the extracted answers."""
    prompts = prompt_rows("g", "xml_cot", [("q0", "42"), ("q1", "7")])
    xml = "<reasoning>\nr\n</reasoning>\n<answer>\n{}\n</answer>".format
    base = {("p000", 0): xml(41), ("p000", 1): xml(42), ("p000", 2): xml(41), ("p000", 3): xml(40),
            ("p001", 0): xml(1), ("p001", 1): xml(2), ("p001", 2): xml(3), ("p001", 3): xml(4)}
    trained = {("p000", i): xml(42) for i in range(4)} | {("p001", 0): xml(7), ("p001", 1): xml(5),
                                                        ("p001", 2): xml(5), ("p001", 3): xml(7)}
    tables = scored_tables("xml_cot", prompts, {"base": base, "seed1": trained})
    s = evaluate(*tables, template="xml_cot", resamples=200, seed=0)
    p = s["pass_at_k"]["gsm8k_xml"]
    # base: prompt 0 has c=1 of 4, prompt 1 c=0; trained: c=4 and c=2
    assert p["1"]["base"] == pytest.approx((1 / 4 + 0) / 2)
    assert p["2"]["base"] == pytest.approx((1 - 3 / 6 + 0) / 2)
    assert p["2"]["trained"] == pytest.approx((1 + 1 - 1 / 6) / 2)
    assert p["4"]["trained"] == pytest.approx(1.0)
    m = s["maj_at_k"]["gsm8k_xml"]
    assert m["4"]["base"] == 0.0  # majority 41 on prompt 0, a 1-1-1-1 tie (1) on prompt 1
    assert m["4"]["trained"] == pytest.approx(1.0)  # 7-5-5-7 tie: 7 came first
    assert m["3"]["trained"] == pytest.approx(0.5)  # first 3 on prompt 1: 7, 5, 5 -> 5


def test_several_seeds_are_compared_per_seed_and_across_seeds():
    prompts = prompt_rows("g", "xml_cot", [(f"q{i}", str(i)) for i in range(6)])
    xml = "<reasoning>\nr\n</reasoning>\n<answer>\n{}\n</answer>".format
    base = {(f"p{i:03d}", 0): xml(99) for i in range(6)}
    runs = {f"seed{s}": {(f"p{i:03d}", 0): xml(i if i < good else 99) for i in range(6)}
            for s, good in ((1, 2), (2, 4), (3, 6))}
    tables = scored_tables("xml_cot", prompts, {"base": base, **runs})
    s = evaluate(*tables, template="xml_cot", resamples=200, seed=0)
    assert list(s["runs"]) == ["seed1", "seed2", "seed3"]
    per = {k: s["runs"][k]["accuracy"]["gsm8k_xml"]["diff_mean"] for k in s["runs"]}
    assert per == pytest.approx({"seed1": 2 / 6, "seed2": 4 / 6, "seed3": 1.0})
    a = s["across_seeds"]["accuracy/gsm8k_xml"]
    assert a["n_seeds"] == 3 and a["mean"] == pytest.approx(2 / 3)
    assert a["per_seed"] == pytest.approx(per)
    assert a["ci95"][0] < 2 / 3 < a["ci95"][1]
    # the top-level comparison is base against the mean of the seeds per prompt
    assert s["accuracy"]["gsm8k_xml"]["trained"] == pytest.approx(2 / 3)


def test_cli_with_three_seeds(tmp_path):
    res = tmp_path / "results"
    fx = write_rl_fixture(res, "g", "xml_cot", n_prompts=6, samples=2, seeds=(1, 2, 3))
    out = tmp_path / "summary.json"
    assert main(_cli_args(res / "g", fx["config"].model_dump_json(), out, labels=fx["runs"])) == 0
    s = json.loads(out.read_text())
    assert list(s["runs"]) == list(s["checkpoints"]) == ["seed1", "seed2", "seed3"]
    assert s["across_seeds"]["reward"]["n_seeds"] == 3
    assert set(s["pass_at_k"]["gsm8k_xml"]) == {"1", "2"}


def test_usual_answer_baseline_and_its_warning():
    """Gold "1" on 3 of 4 prompts: always answering "1" scores 0.75, so a policy that learned to say "1" has
    learned nothing more (the letter-counting case); one that answers every prompt right clears the bar."""
    from rlmeta.evaluation.evaluate import usual_answer_warning

    prompts = prompt_rows("g", "xml_cot", [("q0", "1"), ("q1", "1"), ("q2", "1"), ("q3", "2")])
    xml = "<reasoning>\nr\n</reasoning>\n<answer>\n{}\n</answer>".format
    base = {(f"p00{i}", j): xml(a) for i, a in enumerate([3, 2, 1, 4]) for j in range(2)}
    always_one = {(f"p00{i}", j): xml(1) for i in range(4) for j in range(2)}
    right = {(f"p00{i}", j): xml(a) for i, a in enumerate([1, 1, 1, 2]) for j in range(2)}
    s = evaluate(*scored_tables("xml_cot", prompts, {"base": base, "seed1": always_one}), template="xml_cot",
                 resamples=200, seed=0)
    u = s["usual_answer"]
    assert (u["metric"], u["answer"], u["accuracy"]) == ("accuracy/gsm8k_xml", "1", pytest.approx(0.75))
    # the 3 most frequent answers of each policy (the base ties 3, 2, 1, 4: the first three seen)
    assert u["candidates"] == {"3": 0.0, "2": pytest.approx(0.25), "1": pytest.approx(0.75)}
    assert u["share"] == {"base": pytest.approx(0.25), "seed1": 1.0}
    assert s["accuracy"]["gsm8k_xml"]["trained"] == pytest.approx(0.75)
    w = usual_answer_warning(s)
    assert w is not None and 'always answering "1" (0.750; 100% of the trained samples' in w
    assert w.endswith("may have learned the usual answer, not the task.")
    s = evaluate(*scored_tables("xml_cot", prompts, {"base": base, "seed1": right}), template="xml_cot",
                 resamples=200, seed=0)
    assert s["usual_answer"]["accuracy"] == pytest.approx(0.75) and s["accuracy"]["gsm8k_xml"]["trained"] == 1.0
    assert usual_answer_warning(s) is None
    wrong = {(f"p00{i}", j): xml(9) for i in range(4) for j in range(2)}  # below the bar, but not by saying "1"
    s = evaluate(*scored_tables("xml_cot", prompts, {"base": base, "seed1": wrong}), template="xml_cot",
                 resamples=200, seed=0)
    assert usual_answer_warning(s).endswith("0% of the trained samples give that answer): a constant answer does as "
                                            "well, so this accuracy shows no skill at the task.")
