"""Config sweeps (``sweeps:`` in an override config) in the workflow's DAG.

A sweep ``{name: {experiment: E, grid: {dotted.key: [values]}}}`` becomes one
experiment per grid point, named ``<sweep>__<lastkey>=<value>__...``
(``rlmeta.settings.expand_sweeps``), each with its own ``results/<point>/``.  Dry runs
only, in a temporary copy of the workflow with a temporary results folder (helpers
from ``rlmeta.testing.workflow``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rlmeta.settings import ROOT, load_config
from rlmeta.testing.workflow import default_seeds, dry_run, job_keys, mirror_workflow

SWEEP = """sweeps:
  lr_temp:
    experiment: gsm8k_grpo_lora
    grid:
      train.learning_rate: [1.0e-3, 4.0e-3]
      train.temperature: [0.7, 1.0]
"""
POINTS = [f"lr_temp__learning_rate={lr}__temperature={t}" for lr in (0.001, 0.004) for t in (0.7, 1.0)]
DEFAULT_EXPERIMENTS = ["headlines_gspo", "headlines_grpo_ued", "gsm8k_grpo_lora", "gsm8k_gspo", "syllogism_grpo_mlx",
                       "syllogism_grpo_trl", "math_fomaml"]
LORA_SEEDS = default_seeds("gsm8k_grpo_lora")  # its sweep points inherit them
PER_POINT = {("make_prompts", ""), ("generate", "policy=base"), ("score", "policy=base"), ("provenance", ""),
             ("evaluate", ""), ("report", "")} | {
    (rule, w) for s in LORA_SEEDS for rule, w in (("generate", f"policy=seed{s}"), ("score", f"policy=seed{s}"),
                                                   ("train_trl", f"seed={s}"))}


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweeps")
    return mirror_workflow(base / "wf"), base


def write(base: Path, name: str, text: str) -> Path:
    path = base / name
    path.write_text(text)
    return path


def metrics_of(results: Path, exp: str) -> list[str]:
    """The train_metrics the summary reads: FOMAML's own, an RL experiment's of each of its seeds in the default
    config (gsm8k_grpo_lora's sweep points inherit its seeds)."""
    if exp == "math_fomaml":
        return [f"{results}/{exp}/train_metrics.parquet"]
    seeds = LORA_SEEDS if exp in POINTS else default_seeds(exp)
    return [f"{results}/{exp}/seed{s}/train_metrics.parquet" for s in seeds]


def per_experiment(planned) -> dict[str, set[tuple[str, str]]]:
    """exp -> {(rule, other wildcards)} of the planned jobs that have an exp wildcard."""
    out: dict[str, set] = {}
    for job in planned:
        wc = dict(job["wildcards"])
        exp = wc.pop("exp", None)
        if exp is not None:
            out.setdefault(exp, set()).add((job["rule"], ", ".join(f"{k}={v}" for k, v in sorted(wc.items()))))
    return out


def the(planned, rule: str) -> dict:
    jobs = [j for j in planned if j["rule"] == rule]
    assert len(jobs) == 1, (rule, jobs)
    return jobs[0]


def test_expand_sweeps_makes_one_experiment_per_point(tmp_path):
    cfg = load_config(ROOT / "config" / "config.yaml", [write(tmp_path, "sweep.yaml", SWEEP)])
    assert list(cfg.experiments) == DEFAULT_EXPERIMENTS + POINTS
    base = cfg.experiments["gsm8k_grpo_lora"].model_dump()
    for name in POINTS:
        exp = cfg.experiments[name].model_dump()
        lr, temp = (float(part.split("=")[1]) for part in name.split("__")[1:])
        assert exp["train"]["learning_rate"] == lr and exp["train"]["temperature"] == temp
        rest = {k: v for k, v in exp["train"].items() if k not in ("learning_rate", "temperature")}
        assert rest == {k: v for k, v in base["train"].items() if k not in ("learning_rate", "temperature")}
        assert {k: v for k, v in exp.items() if k != "train"} == {k: v for k, v in base.items() if k != "train"}
    # the swept experiment itself is unchanged
    assert base == load_config(ROOT / "config" / "config.yaml").experiments["gsm8k_grpo_lora"].model_dump()


@pytest.mark.slow
def test_sweep_dry_run_gives_each_point_its_own_folder(wf):
    workdir, base = wf
    results = base / "results"
    _, planned = dry_run(workdir, results, [write(base, "sweep.yaml", SWEEP)])
    by_exp = per_experiment(planned)
    for point in POINTS:
        assert by_exp[point] == PER_POINT, point
        for job in planned:
            if job["wildcards"].get("exp") == point:
                assert all(out.startswith(f"{results}/{point}/") for out in job["output"]), job
    # one warm start for the whole gsm8k family (two experiments and four points share it)
    warm = [j for j in planned if j["rule"] == "warmstart"]
    keys = sorted(j["wildcards"]["key"] for j in warm)
    assert len(keys) == 3 and keys[0].startswith("tiny_inner_scientist_") and keys[1].startswith("tiny_reasoning_gym_")
    assert keys[2].startswith("tiny_xml_cot_")
    for job in planned:
        if job["rule"] in ("train_trl", "generate") and job["wildcards"]["exp"] in POINTS \
                and job["wildcards"].get("policy", "base") == "base":
            assert f"{results}/warmstart/{keys[2]}" in job["input"], job  # the gsm8k one
    # the cross-experiment summary reads every experiment, sweep points included
    summary = the(planned, "summary")
    for exp in DEFAULT_EXPERIMENTS + POINTS:
        assert f"{results}/{exp}/eval/summary.json" in summary["input"], exp
        assert set(metrics_of(results, exp)) <= set(summary["input"]), exp
    assert len(summary["input"]) == sum(1 + len(metrics_of(results, e)) for e in DEFAULT_EXPERIMENTS + POINTS)
    assert len(the(planned, "all")["input"]) == len(DEFAULT_EXPERIMENTS + POINTS) + 1


@pytest.mark.slow
def test_run_experiments_restricts_all_to_chosen_points(wf):
    workdir, base = wf
    results = base / "results"
    chosen = [POINTS[0], POINTS[3]]
    cfg = write(base, "sweep_chosen.yaml", SWEEP + f"run_experiments: [{', '.join(repr(p) for p in chosen)}]\n")
    _, planned = dry_run(workdir, results, [cfg])
    by_exp = per_experiment(planned)
    # the chosen points, plus the prompts the shared warm start is trained on
    assert set(by_exp) == set(chosen) | {"gsm8k_grpo_lora"}
    assert by_exp["gsm8k_grpo_lora"] == {("make_prompts", "")}
    assert [j["wildcards"]["key"].startswith("tiny_xml_cot_") for j in planned if j["rule"] == "warmstart"] == [True]
    for point in chosen:
        assert by_exp[point] == PER_POINT
    assert sorted(the(planned, "all")["input"]) == sorted(
        [f"{results}/{p}/report/report.html" for p in chosen] + [f"{results}/summary.html"])
    assert sorted(the(planned, "summary")["input"]) == sorted(
        x for p in chosen for x in (f"{results}/{p}/eval/summary.json", *metrics_of(results, p)))
    # no MLX, FOMAML or other data jobs
    assert {r for r, _ in job_keys(planned)} <= {"prepare_gsm8k", "build_model", "make_prompts", "warmstart",
                                                 "generate", "score", "train_trl", "provenance", "evaluate",
                                                 "report", "summary", "all"}


@pytest.mark.slow
def test_sweep_over_a_list_valued_knob(wf):
    workdir, base = wf
    cfg = write(base, "sweep_list.yaml", """sweeps:
  tm:
    experiment: gsm8k_grpo_lora
    grid:
      train.lora.target_modules: [[q_proj, v_proj], [q_proj]]
run_experiments: null
""")
    _, planned = dry_run(workdir, base / "results_list", [cfg])
    points = [e for e in per_experiment(planned) if e.startswith("tm__")]
    assert len(points) == 2
    assert all(set(p) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.=-+,") for p in points)


@pytest.mark.slow
def test_sweep_turning_lora_off(wf):
    workdir, base = wf
    cfg = write(base, "sweep_lora.yaml", """sweeps:
  nolora:
    experiment: gsm8k_grpo_lora
    grid:
      train.lora: [null]
""")
    _, planned = dry_run(workdir, base / "results_lora", [cfg])
    assert per_experiment(planned)["nolora__lora=None"] == PER_POINT
