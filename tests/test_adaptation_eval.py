"""Adaptation evaluation: episodes on held-out subjects and held-out rows, the base initialisation against the
trained methods, intervals over episodes, paired differences, curves; and a fast acceptance run on the embedded
default's data and model."""
from __future__ import annotations

import json

import pytest

from rlmeta.cli import main
from rlmeta.meta.adaptation_eval import correctness, episodes, evaluate, pools
from rlmeta.meta.fomaml import train
from rlmeta.meta.tasks import episode
from rlmeta.settings import ROOT, MetaSettings, ModelBuild, WandbSettings
from rlmeta.testing.models import SUBJECTS, make_tasks, tasks_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN, TEST = SUBJECTS[:2], SUBJECTS[2:]
META = MetaSettings(outer_steps=4, meta_batch_size=2, inner_steps=2, inner_lr=0.05, outer_lr=0.01, support_batch=3,
                    query_batch=3, max_seq_len=128, checkpoint_every=100, test_subjects=TEST, eval_episodes=3,
                    eval_query=4, accuracy_episodes=1)
OFF = WandbSettings(mode="disabled")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return {"model": tasks_model(root / "model"), "tasks": make_tasks(root / "tasks", sizes=(6, 6, 8)), "root": root}


def test_correctness_uses_math_verify():
    assert correctness([("so \\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("no box", "1")]) == [1.0, 0.0, 0.0]


def test_episodes_are_seeded_and_disjoint(env):
    sup, qry = episode(1, "eval", "algebra", 0, 20, 5, 8)
    assert (sup, qry) == episode(1, "eval", "algebra", 0, 20, 5, 8) and len(sup) == 5 and len(qry) == 8
    assert not set(sup) & set(qry)
    assert episode(1, "eval", "algebra", 1, 20, 5, 8) != (sup, qry)
    assert episode(1, "validation", "algebra", 0, 20, 5, 8) != (sup, qry)
    assert len(episode(1, "eval", "algebra", 0, 7, 5, 8)[1]) == 2  # the query takes what the support leaves
    with pytest.raises(ValueError, match="support_batch"):
        episode(1, "eval", "algebra", 0, 5, 5, 8)
    groups = pools(str(env["tasks"]), TRAIN, META)
    assert set(groups["test"]) == set(TEST) and len(groups["test"]["number_theory"]) == 6 + 6 + 8
    assert set(groups["train_rows"]) == set(TRAIN)
    assert all(r["split"] == "heldout" for rows in groups["train_rows"].values() for r in rows)
    eps = episodes(groups, META, 0)
    assert len(eps) == (len(TEST) + len(TRAIN)) * META.eval_episodes
    assert [e["accuracy"] for e in eps[:3]] == [True, False, False]


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_trained_methods_against_base(env, tmp_path, lora):
    """`rlmeta eval-adaptation` with fomaml and multitask trained at the same budget: every block has its
    interval, the curve starts at the pre-adaptation loss and passes the post-adaptation one, and the trained
    methods adapt to a lower held-out query loss than the base."""
    meta = MetaSettings.model_validate({**META.model_dump(), "lora": lora, "outer_lr": 0.05 if lora else 0.01,
                                        "baselines": ["multitask"]})
    args = []
    for m in ("fomaml", "multitask"):
        cfg = MetaSettings.model_validate({**meta.model_dump(), "method": m, "baselines": []})
        final = train(str(env["model"]), str(env["tasks"]), TRAIN, cfg, 2, tmp_path / m / "ck/final",
                      tmp_path / m / "m.parquet", OFF)
        assert (final / "meta_adapter").exists() == bool(lora)
        args += ["--trained", m, str(final), str(tmp_path / m / "m.parquet")]
    out = tmp_path / "summary.json"
    assert main(["eval-adaptation", "--base", str(env["model"]), *args, "--tasks-dir", str(env["tasks"]),
                 "--subjects", *TRAIN, "--settings", meta.model_dump_json(), "--seed", "2", "--max-new-tokens", "4",
                 "--bootstrap", "200", "--out", str(out)]) == 0
    a = json.loads(out.read_text())["adaptation"]
    assert a["methods"] == ["base", "fomaml", "multitask"] and a["method"] == "fomaml"
    assert a["settings"]["lora"] == (lora is not None) and a["settings"]["curve_steps"] == 4
    assert a["n_episodes"] == {"test": 3, "train_rows": 6}
    for m in a["methods"]:
        for g in ("test", "train_rows"):
            b = a[m][g]
            assert len(b["curve"]) == 5 and b["curve"][0]["mean"] == pytest.approx(b["pre_loss"]["mean"])
            assert b["curve"][2]["mean"] == pytest.approx(b["post_loss"]["mean"])
            assert b["gain"]["mean"] > 0  # the inner loop adapts
            assert 0.0 <= b["accuracy"]["mean"] <= 1.0 and b["accuracy"]["n"] == a["n_episodes"][g] // 3
        assert a[m]["post_loss"] == a[m]["test"]["post_loss"]
    for m in ("fomaml", "multitask"):
        assert a[m]["post_loss"]["mean"] < a["base"]["post_loss"]["mean"]
    assert a["paired"]["fomaml - base"]["test"]["post_loss"]["ci95"][1] < 0
    assert a["fomaml"]["compute"] == a["multitask"]["compute"] and a["fomaml"]["compute"]["outer_steps"] == 4
    assert set(a["per_subject"]) == set(SUBJECTS) and a["per_subject"]["number_theory"]["held_out_subject"]
    assert a["meta_init_query_loss"] == a["fomaml"]["post_loss"]["mean"]
    assert a["conclusion"].startswith("On the unseen subjects (number_theory)")


def test_same_checkpoint_gives_same_numbers(env):
    """Base and a 'trained' method the same folder: identical episodes (seeded draws, exact restore), paired
    differences exactly 0."""
    a = evaluate(str(env["model"]), {"fomaml": str(env["model"])}, str(env["tasks"]), TRAIN, META, 0, 2)["adaptation"]
    for g in ("test", "train_rows"):
        assert a["base"][g]["post_loss"] == a["fomaml"][g]["post_loss"]
        assert a["base"][g]["pre_loss"] == a["fomaml"][g]["pre_loss"]
        assert a["paired"]["fomaml - base"][g]["post_loss"] == {"mean": 0.0, "ci95": [0.0, 0.0],
                                                                "n": a["n_episodes"][g]}


@pytest.mark.slow
def test_embedded_default_acceptance(tmp_path):
    """The embedded default's data (bundled MATH sample, its task split) and model build (tiny Qwen3, BPE 2048),
    shrunk to seconds: fomaml and multitask trained at the same budget on the five training subjects, evaluated
    on the two held-out subjects against the base. Both trained initialisations adapt to a lower held-out query
    loss than the base, with the whole interval of the paired difference below 0, and the summary states which
    method adapts best. (The full-size comparison is the workflow's; its figures are in docs/meta-learning.md.)"""
    from rlmeta.data.math_problems import SLUGS, prepare_math, split_math_tasks
    from rlmeta.models.build import build_tiny_model
    from rlmeta.settings import load_config

    res = ROOT / "resources"
    default = load_config(ROOT / "config/config.yaml").experiments["math_fomaml"].meta
    meta = MetaSettings.model_validate({**default.model_dump(), "outer_steps": 4, "meta_batch_size": 2,
                                        "support_batch": 4, "query_batch": 4, "max_seq_len": 96, "warmup_steps": 1,
                                        "validate_every": 2, "validate_episodes": 1, "eval_episodes": 2,
                                        "eval_query": 4, "accuracy_episodes": 1, "curve_steps": 2})
    prepare_math(str(res / "math"), tmp_path / "math")
    split_math_tasks(tmp_path / "math/train.parquet", SLUGS, 0.30, 0.40, 1234, tmp_path / "tasks")
    corpus = [f for sub in ("rss", "gsm8k", "math") for f in sorted((res / sub).glob("*")) if f.is_file()]
    model = build_tiny_model(tmp_path / "tiny", ModelBuild(tokenizer="bpe"), corpus, 1234)  # the default build
    train_subjects = [s for s in SLUGS if s not in meta.test_subjects]
    trained, metrics = {}, {}
    for m in ("fomaml", "multitask"):
        cfg = MetaSettings.model_validate({**meta.model_dump(), "method": m, "baselines": []})
        trained[m] = str(train(str(model), str(tmp_path / "tasks"), train_subjects, cfg, 1234, tmp_path / m / "final",
                               tmp_path / m / "m.parquet", OFF))
        metrics[m] = str(tmp_path / m / "m.parquet")
    a = evaluate(str(model), trained, str(tmp_path / "tasks"), train_subjects, meta, 1234, 8, metrics,
                 500)["adaptation"]
    assert a["fomaml"]["compute"] == a["multitask"]["compute"]
    for m in ("fomaml", "multitask"):
        assert a[m]["post_loss"]["ci95"][1] < a["base"]["post_loss"]["ci95"][0], m
        assert len(a[m]["validation"]) == 2
    assert a["paired"]["fomaml - base"]["test"]["post_loss"]["ci95"][1] < 0
    assert "fomaml − multitask" in a["conclusion"] and "adapts best" in a["conclusion"]
