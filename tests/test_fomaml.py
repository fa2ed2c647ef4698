"""FOMAML on a tiny Qwen3: meta-gradient against a hand-written reference, exact restore,
meta-LoRA, metrics, resume."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from meta_helpers import SUBJECTS, make_tasks, tiny_model
from rlmeta.meta.distributed import DistContext
from rlmeta.meta.fomaml import FOMAML, lr_factor, meta_settings, train
from rlmeta.meta.tasks import TaskSampler, load_tasks

META = {"outer_steps": 3, "meta_batch_size": 2, "inner_steps": 2, "inner_lr": 0.05, "outer_lr": 0.01,
        "support_batch": 3, "query_batch": 3, "max_seq_len": 128, "checkpoint_every": 1, "lr_schedule": "cosine"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fomaml")
    return {"model": tiny_model(root / "model"), "tasks": make_tasks(root / "tasks"), "root": root}


def learner(env, meta=META, lora=None, seed=3):
    from rlmeta.meta.fomaml import load_model

    cfg = meta_settings({**meta, "lora": lora})
    tok, model = load_model(str(env["model"]), cfg["lora"], seed, torch.device("cpu"))
    sup, qry = load_tasks(env["tasks"], SUBJECTS, "support"), load_tasks(env["tasks"], SUBJECTS, "query")
    return FOMAML(model, tok, sup, qry, cfg, seed, DistContext())


def test_sampler_is_a_function_of_seed_and_step():
    s = TaskSampler(SUBJECTS, 7)
    assert s.meta_batch(4, 2) == TaskSampler(SUBJECTS, 7).meta_batch(4, 2)
    assert len(set(s.meta_batch(0, 3))) == 3 and len(s.meta_batch(0, 5)) == 5
    assert s.rows(1, 0, "algebra", "support", 6, 4) == s.rows(1, 0, "algebra", "support", 6, 4)
    assert len(set(s.rows(1, 0, "algebra", "support", 6, 4))) == 4


def test_lr_schedule():
    assert lr_factor(0, 2, 10, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(2, 2, 10, "cosine") == 1.0 and lr_factor(10, 2, 10, "linear") == 0.0
    assert lr_factor(5, 0, 10, "constant") == 1.0


def test_meta_gradient_matches_reference_and_restores_exactly(env):
    lr = learner(env)
    theta = [p.detach().clone() for p in lr.params]
    grads, info = lr.meta_gradient(0)
    for p, t in zip(lr.params, theta):  # bit-exact restore after every task
        assert torch.equal(p.detach(), t)
    tasks = lr.sampler.meta_batch(0, META["meta_batch_size"])
    ref = [torch.zeros_like(t) for t in theta]
    for slot, task in enumerate(tasks):  # plain torch: copy, k SGD steps, query grad at phi
        m = copy.deepcopy(lr.model).train()
        sup, qry = lr.batch(0, slot, task, "support"), lr.batch(0, slot, task, "query")
        for _ in range(META["inner_steps"]):
            m.zero_grad()
            m(**sup).loss.backward()  # transformers' own shifted, masked token-mean loss
            with torch.no_grad():
                for p in m.parameters():
                    p -= META["inner_lr"] * p.grad
        m.zero_grad()
        m(**qry).loss.backward()
        for r, p in zip(ref, m.parameters()):
            r += p.grad / len(tasks)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    assert info["stats"][:, 2].sum() == len(tasks)
    assert all(g.abs().sum() > 0 for g in grads[:3])


def test_outer_step_metrics(env):
    lr = learner(env)
    row = lr.step(0)
    assert row["step"] == 1 and row["tokens"] > 0 and row["grad_norm"] > 0
    sampled = set(lr.sampler.meta_batch(0, 2))
    for s in SUBJECTS:
        gap = row[f"{s}/adaptation_gap"]
        assert math.isnan(gap) == (s not in sampled)
    assert row["meta/loss"] == row["loss"]
    assert row["meta/avg_adaptation_gap"] == pytest.approx(row["meta/query_loss_pre"] - row["meta/loss"])
    assert row["meta/avg_adaptation_gap"] > 0  # inner SGD lowers the query loss of these easy tasks


def test_meta_lora_trains_only_the_adapter(env):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    lr = learner(env, lora=lora)
    names = {id(p): n for n, p in lr.model.named_parameters()}
    assert lr.params and all("lora_" in names[id(p)] for p in lr.params)
    base = {n: p.detach().clone() for n, p in lr.model.named_parameters() if "lora_" not in n}
    lora_before = [p.detach().clone() for p in lr.params]
    lr.step(0)
    lr.step(1)
    for n, p in lr.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), base[n]), n
    assert any(not torch.equal(a, p.detach()) for a, p in zip(lora_before, lr.params))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_train_resume_and_lora_merge(env, tmp_path):
    kw = dict(model_dir=str(env["model"]), tasks_dir=str(env["tasks"]), subjects=SUBJECTS, seed=5)
    a = train(meta=META, out=tmp_path / "a/checkpoints/final", metrics=tmp_path / "a/m.parquet",
              wandb_cfg={"mode": "offline", "project": "test"}, **kw)
    assert list((tmp_path / "a/checkpoints").glob("wandb/offline-run-*"))
    # interrupted after 2 steps (checkpoint at step 2), then rerun: resumes and ends the same
    b_out, b_metrics = tmp_path / "b/checkpoints/final", tmp_path / "b/m.parquet"
    train(meta=META, out=b_out, metrics=b_metrics, wandb_cfg={"mode": "disabled"}, stop_after=2, **kw)
    assert not b_out.exists() and (tmp_path / "b/checkpoints/2/state.json").exists()
    b_metrics.unlink()  # Snakemake deletes a failed job's outputs; the rows come back from the checkpoint
    train(meta=META, out=b_out, metrics=b_metrics, wandb_cfg={"mode": "disabled"}, **kw)
    wa, wb = _weights(a), _weights(b_out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    ma, mb = pq.read_table(tmp_path / "a/m.parquet").to_pylist(), pq.read_table(b_metrics).to_pylist()
    assert [r["step"] for r in mb] == [1, 2, 3]
    assert [r["meta/loss"] for r in ma] == pytest.approx([r["meta/loss"] for r in mb], abs=1e-6)
    assert {"meta/loss", "meta/avg_adaptation_gap", "algebra/adaptation_gap", "lr", "tokens"} <= set(ma[0])
    base = _weights(env["model"])
    assert any(not torch.equal(wa[k], base[k]) for k in base)
    # meta-LoRA: merged full checkpoint, only the adapted projections differ from the base
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    c = train(meta={**META, "outer_steps": 2, "lora": lora}, out=tmp_path / "c/final", metrics=tmp_path / "c/m.parquet",
              wandb_cfg={"mode": "disabled"}, **kw)
    wc = _weights(c)
    assert set(wc) == set(base)
    for k in base:
        same = torch.equal(wc[k], base[k])
        assert same != ("q_proj" in k or "v_proj" in k), k
    assert json.loads((c / "config.json").read_text())["model_type"] == "qwen3"
