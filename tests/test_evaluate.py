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
from rlmeta.testing.fixtures import prompt_rows, response_rows, write_rl_fixture


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


def _cli_args(d: Path, config: str, out: Path) -> list[str]:
    tables = [x for pol in ("base", "trained") for x in (f"--responses-{pol}", str(d / f"responses/{pol}.parquet"),
                                                         f"--rewards-{pol}", str(d / f"rewards/{pol}.parquet"))]
    return ["evaluate", "--experiment", d.name, "--config", config, "--prompts", str(d / "prompts.parquet"), *tables,
            "--checkpoint", str(d / "checkpoints/final"), "--seed", "5", "--out", str(out)]


def test_cli_writes_summary_with_provenance(tmp_path):
    res = tmp_path / "results"
    fx = write_rl_fixture(res, "h", "inner_scientist", n_prompts=6, samples=2)
    cfg = Experiment.model_validate({**fx["config"].model_dump(mode="json"), "eval": {"bootstrap": 300}})
    out = res / "h" / "eval" / "summary.json"
    d = res / "h"
    assert main(_cli_args(d, json.dumps(cfg.model_dump(mode="json")), out)) == 0
    s = json.loads(out.read_text())
    assert s["experiment"] == "h" and s["template"] == "inner_scientist" and s["primary_accuracy"] is None
    assert s["checkpoint"]["sha256"] == hashlib.sha256(b"fake weights h").hexdigest()
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
