"""Reports from fixture tables: files, self-contained HTML, key numbers, escaping; the summary
across experiments; and the real rules (evaluate, report, report_fomaml, summary) plus
`snakemake --report` on a fixture workflow."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rlmeta import provenance
from rlmeta.cli import main
from rlmeta.io import write_json
from rlmeta.report.render import FOMAML_PLOTS, RL_PLOTS, build_report, fmt, fmt_ci
from rlmeta.report.summary import SUMMARY, summary_row
from rlmeta.settings import ROOT, Experiment
from rlmeta.testing.fixtures import NASTY, evaluate_args, report_args, write_fomaml_fixture, write_rl_fixture
from rlmeta.testing.workflow import snakemake_env

REPORT_SAMPLES = {"gsm": 3, "mth": 6}
"""eval.report_samples of the fixture experiments (8 prompts each): the report shows that many."""


def assert_self_contained(page: str) -> None:
    srcs = re.findall(r"""src\s*=\s*["']?([^"'\s>]+)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert not re.search(r"""href=["']?(https?:|//)""", page)


def with_eval(cfg: Experiment, **ev) -> Experiment:
    """The experiment with some eval settings changed (validated again)."""
    raw = cfg.model_dump(mode="json")
    return Experiment.model_validate({**raw, "eval": {**raw["eval"], **ev}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Reports of an RL (GSM8K), an RL (MATH), a 3-seed RL (GSM8K) that games its reward, and a FOMAML
    experiment, and the summary."""
    res = tmp_path_factory.mktemp("report") / "results"
    configs = {}
    for exp, tpl, kw in (("gsm", "xml_cot", {}), ("mth", "math_boxed", {}),
                         ("gam", "xml_cot", {"seeds": (1, 2, 3), "gaming": True})):
        fx = write_rl_fixture(res, exp, tpl, n_prompts=8, samples=2, **kw)
        cfg = with_eval(fx["config"], bootstrap=200, report_samples=REPORT_SAMPLES.get(exp, 2))
        configs[exp] = cfg
        d = res / exp
        assert main(["evaluate", "--experiment", exp, "--config", cfg.model_dump_json(),
                     *evaluate_args(d, fx["runs"]), "--out", str(d / "eval/summary.json")]) == 0
        assert main(["report", "--experiment", exp, "--config", cfg.model_dump_json(), "--summary",
                     str(d / "eval/summary.json"), *report_args(d, fx["runs"]), "--out-dir", str(d / "report")]) == 0
    configs["fm"] = write_fomaml_fixture(res, "fm")["config"]
    assert main(["report", "--experiment", "fm", "--config", configs["fm"].model_dump_json(), "--summary",
                 str(res / "fm/eval/summary.json"), "--metrics", str(res / "fm/train_metrics.parquet"),
                 "--out-dir", str(res / "fm/report")]) == 0
    experiments = json.dumps({k: v.model_dump(mode="json") for k, v in configs.items()})
    assert main(["summarize", "--results", str(res), "--experiments", experiments,
                 "--out-parquet", str(res / "summary.parquet"), "--out-html", str(res / "summary.html")]) == 0
    return res


def test_rl_report_files_numbers_and_escaping(built):
    out = built / "gsm" / "report"
    for f in RL_PLOTS:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert page.count("data:image/png;base64,") == len(RL_PLOTS)
    s = json.loads((built / "gsm/eval/summary.json").read_text())
    r = s["reward"]
    for x in (fmt(r["base_mean"]), fmt(r["trained_mean"]), fmt(r["diff_mean"], signed=True), fmt_ci(r["diff_ci95"])):
        assert x in page and x in (out / "report.md").read_text()
    for name, a in s["accuracy"].items():
        assert name in page and fmt(a["base"]) in page
    assert NASTY not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    md = (out / "report.md").read_text()
    assert all(f"]({f})" in md for f in RL_PLOTS)
    assert NASTY in md and "```text" in md  # verbatim inside fenced blocks


@pytest.mark.parametrize("exp", sorted(REPORT_SAMPLES))
def test_sample_count_comes_from_eval_report_samples(built, exp):
    n = REPORT_SAMPLES[exp]
    md = (built / exp / "report/report.md").read_text()
    assert md.count("### Example ") == n and f"### Example {n}\n" in md
    assert f"on the first {n} held-out prompts" in md
    page = (built / exp / "report/report.html").read_text()
    long_table = page[page.index("<table class='long'>", page.index("Sample completions")):]
    assert long_table[:long_table.index("</table>")].count("<tr>") == n + 1  # header + one row per prompt


def test_build_report_takes_the_experiment(built, tmp_path):
    """build_report on an Experiment: report_samples 0 gives an empty samples table, the provenance
    lists the experiment's fields."""

    d = built / "gsm"
    cfg = Experiment(dataset="gsm8k", prompt="xml_cot", model="tiny", backend="torch", algorithm="grpo",
                     train={"steps": 12}, eval={"report_samples": 0})
    summary = json.loads((d / "eval/summary.json").read_text())
    tables = {"prompts": pq.read_table(d / "prompts.parquet").to_pandas(),
              "responses": {p: pq.read_table(d / f"responses/{p}.parquet").to_pandas() for p in ("base", "seed1234")},
              "rewards": {p: pq.read_table(d / f"rewards/{p}.parquet").to_pandas() for p in ("base", "seed1234")}}
    rep = build_report("gsm", cfg, summary, None, tmp_path / "out", tables)
    samples = next(sec for sec in rep.sections if sec.title.startswith("Sample completions"))
    assert samples.tables[0].rows == []
    meta = dict(rep.meta)
    assert {k: meta[k] for k in ("experiment", "algorithm", "backend", "model", "dataset", "template")} == {
        "experiment": "gsm", "algorithm": "grpo", "backend": "torch", "model": "tiny", "dataset": "gsm8k",
        "template": "xml_cot"}
    assert meta["config sha256"] == summary["config_hash"]
    assert all((tmp_path / "out" / f).is_file() for f in RL_PLOTS)


def test_report_leads_with_accuracy_and_shows_training_evidence(built):
    md = (built / "gsm/report/report.md").read_text()
    first = md[md.index("**"):].split("\n")[0]
    assert first.startswith("**Accuracy gsm8k_xml:"), first  # the task result comes first, the reward after it
    lead = md[md.index("**"):md.index("\n\n", md.index("**"))]
    assert lead.index("Accuracy gsm8k_xml") < lead.index("Total reward")
    assert "pass@2 gsm8k_xml" in md and "maj@2 gsm8k_xml" in md
    assert "## Evaluation during training" in md and "](eval_curve.png)" in md
    assert "## Training rollouts: best and worst completion of a group" in md
    assert "Warning." not in md
    page = (built / "gsm/report/report.html").read_text()
    assert "id='reward-accuracy-warning'" not in page and "id='lead'" in page


def test_report_warns_when_reward_rises_and_accuracy_falls(built):
    s = json.loads((built / "gam/eval/summary.json").read_text())
    assert s["reward"]["diff_ci95"][0] > 0 > s["accuracy"]["gsm8k_xml"]["diff_ci95"][1]
    page = (built / "gam/report/report.html").read_text()
    assert page.index("id='reward-accuracy-warning'") < page.index("id='lead'")
    assert "the policy learned the reward, not the task" in page
    md = (built / "gam/report/report.md").read_text()
    assert md.index("> **Warning.**") < md.index("**Accuracy gsm8k_xml")
    assert "across 3 seeds" in md and "](seeds.png)" in md
    for label in ("seed1", "seed2", "seed3"):
        assert label in md


def test_math_report_has_per_subject_table(built):
    page = (built / "mth/report/report.html").read_text()
    assert "Per subject" in page and "algebra" in page and "geometry" in page


def test_fomaml_report(built):
    out = built / "fm" / "report"
    assert all((out / f).stat().st_size > 1000 for f in FOMAML_PLOTS)
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "2.6000" in page and "2.3000" in page and "-0.3000" in page  # base/meta query losses, difference
    assert "number_theory" in page and "Meta-training curves" in page


def test_summary_rows(built):
    t = pq.read_table(built / "summary.parquet")
    assert t.schema.equals(SUMMARY)
    rows = {r["experiment"]: r for r in t.to_pylist()}
    gam = json.loads((built / "gam/eval/summary.json").read_text())
    assert rows["gam"]["seeds"] == 3 and rows["gam"]["accuracy_diff"] < 0 < rows["gam"]["reward_diff"]
    a = gam["across_seeds"]["accuracy/gsm8k_xml"]
    assert (rows["gam"]["accuracy_seeds_low"], rows["gam"]["accuracy_seeds_high"]) == pytest.approx(a["ci95"])
    assert set(rows) == {"gsm", "mth", "gam", "fm"}
    s = json.loads((built / "gsm/eval/summary.json").read_text())
    g = rows["gsm"]
    assert g["reward_diff"] == pytest.approx(s["reward"]["diff_mean"]) and g["steps"] == 12
    assert g["reward_diff_low"] == pytest.approx(s["reward"]["diff_ci95"][0]) and g["algorithm"] == "grpo"
    assert g["accuracy_metric"] == "gsm8k_xml" and g["gsm8k_strict_base"] is not None and g["train_seconds"] > 0
    assert rows["mth"]["accuracy_metric"] == "math_verify"
    assert rows["fm"]["base_init_query_loss"] == 2.6 and rows["fm"]["meta_init_query_loss"] == 2.3
    assert rows["fm"]["reward_base"] is None and rows["fm"]["steps"] == 10
    assert rows["fm"]["accuracy_metric"] == "query accuracy (subject mean)"
    assert rows["fm"]["accuracy_base"] == pytest.approx(0.1) and rows["fm"]["accuracy_trained"] == pytest.approx(0.15)
    page = (built / "summary.html").read_text()
    assert_self_contained(page)
    assert "href='gsm/report/report.html'" in page and fmt(s["reward"]["diff_mean"], signed=True) in page


SNAKEFILE = """configfile: "config/config.yaml"
shell.prefix("set -euo pipefail; export PYTHONPATH={src}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
include: "rules/common.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
rule all:
    input: final_targets()
    default_target: True
"""


def test_summary_row_without_metrics():
    """Steps come from the config block when there is no train_metrics table."""
    rl = Experiment(dataset="gsm8k", prompt="xml_cot", model="tiny", backend="torch", algorithm="grpo",
                    train={"steps": 7})
    fm = Experiment(dataset="math", prompt="math_boxed", model="tiny", backend="torch", algorithm="fomaml",
                    meta={"outer_steps": 5})
    assert summary_row("a", rl, {})["steps"] == 7 and summary_row("b", fm, {})["steps"] == 5
    assert summary_row("a", rl, {})["train_seconds"] is None


@pytest.mark.slow
def test_rules_and_snakemake_report(tmp_path):
    """The real rules on fixture results of the default config's experiments, then `--report`."""
    wf = tmp_path / "wf"
    wf.mkdir()
    for name in ("src", "scripts", "rules", "config", "report", "envs", "resources"):
        (wf / name).symlink_to(ROOT / name)
    (wf / "Snakefile").write_text(SNAKEFILE.format(src=ROOT / "src"))
    res = wf / "results"
    write_rl_fixture(res, "headlines_gspo", "inner_scientist", n_prompts=6, samples=2)
    write_rl_fixture(res, "gsm8k_grpo_lora", "xml_cot", n_prompts=6, samples=2, seeds=(1, 2, 3))
    write_fomaml_fixture(res, "math_fomaml")
    for exp in ("headlines_gspo", "gsm8k_grpo_lora", "math_fomaml"):  # rules/provenance.smk is not included
        write_json(res / exp / "provenance.json", provenance.build(exp, {}, 1234, [], {}, []))
    env = snakemake_env()
    sm = [sys.executable, "-m", "snakemake", "--cores", "2", "--config", "wandb={mode: disabled}",
          "run_experiments=[headlines_gspo, gsm8k_grpo_lora, math_fomaml]"]
    out = subprocess.run(sm, cwd=wf, capture_output=True, text=True, env=env, timeout=600)
    logs = "\n".join(p.read_text() for p in (res / "logs").rglob("*.log")) if (res / "logs").exists() else ""
    assert out.returncode == 0, out.stderr[-4000:] + logs[-3000:]
    for rule in ("evaluate", "report", "report_fomaml", "summary"):
        assert f"rule {rule}:" in out.stderr or f"localrule {rule}:" in out.stderr, rule
    for exp in ("headlines_gspo", "gsm8k_grpo_lora", "math_fomaml"):
        assert (res / exp / "report" / "report.html").exists()
    s = json.loads((res / "gsm8k_grpo_lora/eval/summary.json").read_text())
    assert s["experiment"] == "gsm8k_grpo_lora" and len(s["config_hash"]) == 64 and s["bootstrap"]["resamples"] == 2000
    assert pq.read_table(res / "summary.parquet").num_rows == 3
    out = subprocess.run(sm + ["--report", "report.html"], cwd=wf, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    page = (wf / "report.html").read_text()
    for name in ("training_curves.png", "paired_differences.png", "adaptation.png", "meta_training.png",
                 "gsm8k_grpo_lora"):
        assert name in page, name
