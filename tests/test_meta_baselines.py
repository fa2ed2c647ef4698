"""Meta-learning baselines at equal compute: Reptile and multi-task against hand-written references, the budget
(outer steps, gradient passes, tokens) equal across methods and checked by the evaluation, held-out subjects
never in a training batch, meta-validation rows, and the config checks of the new keys."""
from __future__ import annotations

import copy
import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from rlmeta.meta.adaptation_eval import evaluate
from rlmeta.meta.distributed import DistContext
from rlmeta.meta.fomaml import FOMAML, load_model, train, validation_rows
from rlmeta.meta.tasks import load_tasks
from rlmeta.settings import ROOT, ConfigError, MetaSettings, WandbSettings, load_config
from rlmeta.testing.models import SUBJECTS, make_tasks, tasks_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN, TEST = SUBJECTS[:2], SUBJECTS[2:]  # algebra, geometry | number_theory
META = MetaSettings(outer_steps=2, meta_batch_size=2, inner_steps=2, inner_lr=0.05, outer_lr=0.01, support_batch=3,
                    query_batch=3, max_seq_len=128, checkpoint_every=100, test_subjects=TEST, eval_episodes=2,
                    eval_query=3, accuracy_episodes=1)
OFF = WandbSettings(mode="disabled")


def settings(meta: MetaSettings = META, **changes) -> MetaSettings:
    return MetaSettings.model_validate({**meta.model_dump(), **changes})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_baselines")
    return {"model": tasks_model(root / "model"), "tasks": make_tasks(root / "tasks", sizes=(6, 6, 8)), "root": root}


def learner(env, meta: MetaSettings, seed: int = 3, subjects=TRAIN, validation=None) -> FOMAML:
    tok, model = load_model(str(env["model"]), meta.lora, seed, torch.device("cpu"))
    sup, qry = load_tasks(env["tasks"], subjects, "support"), load_tasks(env["tasks"], subjects, "query")
    return FOMAML(model, tok, sup, qry, meta, seed, DistContext(), validation)


def _sgd(m, batch, lr):
    m.zero_grad()
    m(**batch).loss.backward()  # transformers' own shifted, masked token-mean loss
    with torch.no_grad():
        for p in m.parameters():
            p -= lr * p.grad


def test_reptile_update_matches_hand_computed_reference(env):
    """Reptile (Nichol et al. 2018): per task k SGD steps on the support batch and one on the query batch give
    phi; the meta-gradient is mean (theta - phi) / (inner_lr (k + 1)), and the outer step is AdamW on it."""
    meta = settings(method="reptile", max_grad_norm=None, lr_schedule="constant")
    lr = learner(env, meta)
    theta = [p.detach().clone() for p in lr.params]
    tasks = lr.sampler.meta_batch(0, meta.meta_batch_size)
    phis = []
    for slot, task in enumerate(tasks):  # plain torch on a copy
        m = copy.deepcopy(lr.model).train()
        for _ in range(meta.inner_steps):
            _sgd(m, lr.batch(0, slot, task, "support"), meta.inner_lr)
        _sgd(m, lr.batch(0, slot, task, "query"), meta.inner_lr)
        phis.append([p.detach().clone() for p in m.parameters()])
    mean_phi = [sum(ps) / len(phis) for ps in zip(*phis)]
    ref = [(t - f) / (meta.inner_lr * (meta.inner_steps + 1)) for t, f in zip(theta, mean_phi)]
    grads, info = lr.meta_gradient(0)
    for p, t in zip(lr.params, theta):  # theta restored bit for bit after every task
        assert torch.equal(p.detach(), t)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert info["grad_passes"] == len(tasks) * (meta.inner_steps + 1)
    # the outer step: AdamW (weight decay 0) on that gradient, the same optimizer as FOMAML's (fed the learner's
    # gradient: Adam's first step divides by |g|, which turns 1e-9 rounding of near-zero entries into 1e-4)
    copies = [t.clone().requires_grad_(True) for t in theta]
    opt = torch.optim.AdamW(copies, lr=meta.outer_lr, weight_decay=0.0)
    for c, g in zip(copies, grads):
        c.grad = g.clone()
    opt.step()
    lr.step(0)
    for p, c in zip(lr.params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), atol=1e-6, rtol=0)
    # the classic form theta + eps (mean phi - theta) is the same direction: the gradient is a multiple of it
    flat_g = torch.cat([g.flatten() for g in ref])
    flat_d = torch.cat([(f - t).flatten() for f, t in zip(mean_phi, theta)])
    assert torch.allclose(-flat_g * meta.inner_lr * (meta.inner_steps + 1), flat_d, atol=1e-7)


def test_multitask_gradient_is_the_mean_gradient_at_theta(env):
    """Multi-task fine-tuning: the same k + 1 passes, all at theta (nothing adapts)."""
    meta = settings(method="multitask")
    lr = learner(env, meta)
    theta = [p.detach().clone() for p in lr.params]
    tasks = lr.sampler.meta_batch(0, meta.meta_batch_size)
    ref = [torch.zeros_like(t) for t in theta]
    k = meta.inner_steps
    for slot, task in enumerate(tasks):
        m = copy.deepcopy(lr.model).train()
        for batch, w in ((lr.batch(0, slot, task, "support"), k), (lr.batch(0, slot, task, "query"), 1)):
            m.zero_grad()
            m(**batch).loss.backward()
            for r, p in zip(ref, m.parameters()):
                r += w * p.grad / ((k + 1) * len(tasks))
    grads, info = lr.meta_gradient(0)
    assert all(torch.equal(p.detach(), t) for p, t in zip(lr.params, theta))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    st = info["stats"]
    assert torch.equal(st[:, 0], st[:, 1])  # no adaptation: the query loss "after" is the one at theta


@pytest.fixture(scope="module")
def three_methods(env):
    """fomaml, reptile and multitask, 2 outer steps each with the same settings and seed, validated every step."""
    out = {}
    for m in ("fomaml", "reptile", "multitask"):
        d = env["root"] / m
        train(str(env["model"]), str(env["tasks"]), TRAIN, settings(method=m, validate_every=1), 4,
              d / "ck/final", d / "m.parquet", OFF)
        out[m] = d
    return out


def test_equal_compute_accounting(env, three_methods):
    """Every method: the same outer steps, gradient passes and tokens (all passes, and those with a backward),
    step by step, and the passes and tokens are what the sampled batches hold."""
    tables = {m: pq.read_table(d / "m.parquet").to_pylist() for m, d in three_methods.items()}
    cols = ("step", "grad_passes", "train_tokens", "tokens")
    ref = [{c: r[c] for c in cols} for r in tables["fomaml"]]
    assert [r["step"] for r in ref] == [1, 2]
    for m, rows in tables.items():
        assert [{c: r[c] for c in cols} for r in rows] == ref, m
    lr = learner(env, settings(), seed=4)
    k, b = META.inner_steps, META.meta_batch_size
    for t, row in enumerate(ref):
        tasks = lr.sampler.meta_batch(t, b)
        sup = [int(lr.batch(t, i, s, "support")["attention_mask"].sum()) for i, s in enumerate(tasks)]
        qry = [int(lr.batch(t, i, s, "query")["attention_mask"].sum()) for i, s in enumerate(tasks)]
        assert row["grad_passes"] == b * (k + 1)
        assert row["train_tokens"] == k * sum(sup) + sum(qry)
        assert row["tokens"] == k * sum(sup) + 2 * sum(qry)  # plus the query forward before adapting


def test_evaluation_records_and_checks_the_budgets(env, three_methods, tmp_path):
    trained = {m: str(d / "ck/final") for m, d in three_methods.items()}
    metrics = {m: str(d / "m.parquet") for m, d in three_methods.items()}
    cfg = settings(baselines=["reptile", "multitask"])
    ad = evaluate(str(env["model"]), trained, str(env["tasks"]), TRAIN, cfg, 0, 4, metrics, 200)["adaptation"]
    assert ad["methods"] == ["base", "fomaml", "reptile", "multitask"]
    budgets = {m: ad[m]["compute"] for m in ad["methods"]}
    assert budgets["base"] == {"outer_steps": 0, "grad_passes": 0, "train_tokens": 0}
    assert budgets["fomaml"] == budgets["reptile"] == budgets["multitask"]
    assert budgets["fomaml"]["outer_steps"] == 2 and budgets["fomaml"]["grad_passes"] == 2 * 2 * 3
    for m in ad["methods"]:  # adaptation.<method>.{pre_loss, post_loss, gain} with intervals over episodes
        for q in ("pre_loss", "post_loss", "gain"):
            c = ad[m][q]
            assert c["n"] == len(TEST) * cfg.eval_episodes and c["ci95"][0] <= c["mean"] <= c["ci95"][1], (m, q)
        assert ad[m]["gain"]["mean"] == pytest.approx(ad[m]["pre_loss"]["mean"] - ad[m]["post_loss"]["mean"])
        assert len(ad[m]["validation"]) == (0 if m == "base" else 2)
    assert set(ad["paired"]) == {"fomaml - base", "fomaml - reptile", "fomaml - multitask"}
    d = ad["paired"]["fomaml - multitask"]["test"]["post_loss"]
    assert d["mean"] == pytest.approx(ad["fomaml"]["post_loss"]["mean"] - ad["multitask"]["post_loss"]["mean"])
    assert "adapts best" in ad["conclusion"] and "multitask" in ad["conclusion"]
    # the report leads with that sentence, then the table with intervals and budgets, and draws the curves
    from rlmeta.report.render import FOMAML_PLOTS, build_report, to_markdown
    from rlmeta.settings import Experiment

    exp = Experiment(dataset="math", prompt="math_boxed", model="tiny", backend="torch", algorithm="fomaml",
                     meta=cfg.model_dump())
    rep = build_report("e", exp, {"adaptation": ad}, pq.read_table(metrics["fomaml"]).to_pandas(), tmp_path / "r")
    md = to_markdown(rep)
    assert rep.lead == [ad["conclusion"]] and ad["conclusion"] in md
    assert "| fomaml (this experiment) |" in md and "| fomaml - multitask |" in md
    assert all((tmp_path / "r" / f).stat().st_size > 1000 for f in FOMAML_PLOTS)
    # a method trained with another budget is refused
    short = tmp_path / "short.parquet"
    t = pq.read_table(metrics["multitask"])
    pq.write_table(t.slice(0, 1), short)
    with pytest.raises(ValueError, match="budgets differ"):
        evaluate(str(env["model"]), trained, str(env["tasks"]), TRAIN, cfg, 0, 4, {**metrics, "multitask": str(short)})


def test_test_subjects_never_in_a_training_batch(env, three_methods):
    """The ids of every sampled training row are from the training subjects' support/query splits; the held-out
    subject only appears in meta-validation, whose rows are its own; a training subject that is also a test
    subject is refused."""
    val = validation_rows(env["tasks"], META)
    assert set(val) == set(TEST)
    for method in ("fomaml", "reptile", "multitask"):
        lr = learner(env, settings(method=method, validate_every=1, outer_steps=4), validation=val)
        for step in range(4):
            lr.step(step)
            lr.validate()
        assert lr.seen and all(i.split("/")[0] in TRAIN and i.split("/")[1] in ("support", "query") for i in lr.seen)
        assert not {i for i in lr.seen if i.split("/")[0] in TEST}
        assert set(lr.data["support"]) == set(lr.data["query"]) == set(TRAIN)
    with pytest.raises(ValueError, match=r"subjects \['number_theory'\] are meta.test_subjects"):
        learner(env, META, subjects=SUBJECTS)
    with pytest.raises(ValueError, match="test_subjects"):
        evaluate(str(env["model"]), {}, str(env["tasks"]), SUBJECTS, META, 0, 4)


def test_meta_validation_rows_and_determinism(env, three_methods):
    """validate_every 1: val/* on every step (the same episodes each time); without it the columns are null."""
    rows = pq.read_table(three_methods["fomaml"] / "m.parquet").to_pylist()
    assert all(math.isfinite(r["val/query_loss_post"]) and r["val/number_theory/query_loss_post"] is not None
               for r in rows)
    assert all(r["val/gain"] == pytest.approx(r["val/query_loss_pre"] - r["val/query_loss_post"]) for r in rows)
    assert all(r["val/gain"] > 0 for r in rows)  # the inner steps lower the held-out query loss
    val = validation_rows(env["tasks"], META)
    lr = learner(env, settings(validate_every=1), validation=val)
    theta = [p.detach().clone() for p in lr.params]
    a, b = lr.validate(), lr.validate()
    assert a == b and all(torch.equal(p.detach(), t) for p, t in zip(lr.params, theta))


def test_config_checks_of_the_meta_keys(tmp_path):
    def load(meta: dict):
        p = tmp_path / "c.yaml"
        p.write_text(json.dumps({"run_experiments": ["math_fomaml"], "experiments": {"math_fomaml": {"meta": meta}}}))
        return load_config(ROOT / "config/config.yaml", [p])

    default = load({}).experiments["math_fomaml"].meta
    assert default.method == "fomaml" and "multitask" in default.baselines and len(default.test_subjects) == 2
    with pytest.raises(ConfigError, match="baselines"):
        load({"baselines": ["fomaml"]})
    with pytest.raises(ConfigError, match="test_subjects"):
        load({"test_subjects": ["algebra", "algebra"]})
    everything = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                  "prealgebra", "precalculus"]
    with pytest.raises(ConfigError, match="leaves no subject to meta-train on"):
        load({"test_subjects": everything})
    p = tmp_path / "d.yaml"
    p.write_text(json.dumps({"datasets": {"math": {"subjects": ["algebra", "geometry"]}}}))
    with pytest.raises(ConfigError, match="not subjects of its dataset"):
        load_config(ROOT / "config/config.yaml", [p])
