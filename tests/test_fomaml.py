"""FOMAML on a tiny Qwen3: meta-gradient against a hand-written reference, exact restore,
meta-LoRA, the outer learning-rate schedule, metrics, checkpoints (pruned, with markers), resume, and a run
made to diverge stopped by the divergence guard."""
from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rlmeta import checkpoints
from rlmeta.cli import main
from rlmeta.meta.distributed import DistContext, load_resume
from rlmeta.meta.fomaml import FOMAML, batch_loss, load_model, shard_batch, train
from rlmeta.meta.tasks import TaskSampler, balanced_split, collate, load_tasks
from rlmeta.settings import GuardSettings, MetaSettings, WandbSettings
from rlmeta.testing.models import SUBJECTS, make_tasks, tasks_model
from rlmeta.tracking import METRICS_FILE, DivergenceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

META = MetaSettings(outer_steps=3, meta_batch_size=2, inner_steps=2, inner_lr=0.05, outer_lr=0.01, support_batch=3,
                    query_batch=3, max_seq_len=128, checkpoint_every=1, lr_schedule="cosine")
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
OFF = WandbSettings(mode="disabled")


def settings(meta: MetaSettings = META, **changes) -> MetaSettings:
    """``meta`` with some keys changed (validated again)."""
    return MetaSettings.model_validate({**meta.model_dump(), **changes})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fomaml")
    return {"model": tasks_model(root / "model"), "tasks": make_tasks(root / "tasks"), "root": root}


def learner(env, meta: MetaSettings = META, seed=3):
    tok, model = load_model(str(env["model"]), meta.lora, seed, torch.device("cpu"))
    sup, qry = load_tasks(env["tasks"], SUBJECTS, "support"), load_tasks(env["tasks"], SUBJECTS, "query")
    return FOMAML(model, tok, sup, qry, meta, seed, DistContext())


def test_sampler_is_a_function_of_seed_and_step():
    s = TaskSampler(SUBJECTS, 7)
    assert s.meta_batch(4, 2) == TaskSampler(SUBJECTS, 7).meta_batch(4, 2)
    assert len(set(s.meta_batch(0, 3))) == 3 and len(s.meta_batch(0, 5)) == 5
    assert s.rows(1, 0, "algebra", "support", 6, 4) == s.rows(1, 0, "algebra", "support", 6, 4)
    assert len(set(s.rows(1, 0, "algebra", "support", 6, 4))) == 4


def _padded_cost(lengths, groups) -> int:
    """The slowest rank's padded tokens: rows x its longest row."""
    return max((len(g) * max(lengths[i] for i in g) if g else 0) for g in groups)


@pytest.mark.parametrize("lengths,parts,expected", [
    # the two longest rows alone (2 x 300 = 600), the other six padded to 120 (720): round-robin pads 4 rows to 300
    ([10, 300, 50, 200, 120, 80, 90, 60], 2, [[1, 3], [4, 6, 5, 7, 2, 0]]),
    ([5, 5, 5, 5], 2, [[0, 1], [2, 3]]),  # equal lengths: an even split, ties by position
    ([100] + [10] * 7, 2, [[0], [1, 2, 3, 4, 5, 6, 7]]),
    ([7], 2, [[0], []]),  # fewer rows than ranks: the extra rank gets none (collate pads it one token)
    ([1, 2, 3], 4, [[2], [1], [0], []]),
    ([4, 9, 2], 1, [[0, 1, 2]]),
])
def test_balanced_split_known_cases(lengths, parts, expected):
    assert balanced_split(lengths, parts) == expected


def test_balanced_split_is_optimal_and_beats_round_robin():
    """Against every assignment of up to 8 rows to 2 ranks (brute force), and never worse than rows r::S."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, parts = rng.randint(2, 8), rng.choice([2, 3])
        lengths = [rng.randint(5, 400) for _ in range(n)]
        groups = balanced_split(lengths, parts)
        assert sorted(i for g in groups for i in g) == list(range(n)) and len(groups) == parts
        assert all(groups) or n < parts
        cost = _padded_cost(lengths, groups)
        assert cost <= _padded_cost(lengths, [list(range(r, n, parts)) for r in range(parts)])
        if parts == 2:
            best = min(_padded_cost(lengths, [[i for i in range(n) if a[i] == r] for r in range(2)])
                       for a in itertools.product(range(2), repeat=n) if len(set(a)) == 2)
            assert cost == best, (lengths, groups)


def test_shard_batches_sum_to_the_whole_batch(env):
    """The shard ranks' parts of a batch (length-balanced, uneven) give the whole batch's loss and gradient
    when summed, with no collective: each part carries the whole batch's labelled-token count."""
    lr = learner(env)
    rows = lr.data["support"][SUBJECTS[0]]
    examples = [lr._encode(("t", i), rows[i]) for i in range(len(rows))]
    pad = lr.tok.pad_token_id
    full_loss, full_value, n = batch_loss(lr.model, collate(examples, pad), DistContext())
    full_loss.backward()
    ref = [p.grad.clone() for p in lr.params]
    lr.model.zero_grad()
    values, taken = 0.0, []
    for r in range(2):
        part, mine = shard_batch(examples, pad, DistContext(shard_size=2, shard_rank=r))
        assert part["n_labels"] == n
        loss, value, count = batch_loss(lr.model, part, DistContext(shard_size=2, shard_rank=r))
        loss.backward()
        values += value
        taken += mine
    assert sorted(taken) == list(range(len(examples)))
    assert values == pytest.approx(full_value, rel=1e-6)
    for p, g in zip(lr.params, ref):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def _hf(batch: dict) -> dict:
    """A batch as transformers' forward takes it (without the whole-batch token count)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _lrs(lr: FOMAML, steps: int) -> list[float]:
    """The outer learning rate at each of the first ``steps`` outer steps (scheduler stepped alone)."""
    out = []
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            out.append(lr.opt.param_groups[0]["lr"])
            lr.sched.step()
    return out


@pytest.mark.parametrize("schedule,expected", [
    # transformers' warm-up convention lr * s / W (the first warm-up step has lr 0), then the schedule over T - W
    ("cosine", [0.0, 0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(3, 11)]),
    ("linear", [0.0, 0.5, 1.0] + [(10 - s) / 8 for s in range(3, 11)]),
    ("constant", [0.0, 0.5] + [1.0] * 9),
])
def test_lr_schedule(env, schedule, expected):
    lr = learner(env, settings(outer_steps=10, warmup_steps=2, lr_schedule=schedule, outer_lr=0.02))
    assert _lrs(lr, 11) == pytest.approx([0.02 * f for f in expected], abs=1e-12)
    assert _lrs(learner(env, settings(outer_steps=4, lr_schedule="constant")), 4) == pytest.approx([0.01] * 4)


def test_meta_gradient_matches_reference_and_restores_exactly(env):
    lr = learner(env)
    theta = [p.detach().clone() for p in lr.params]
    grads, info = lr.meta_gradient(0)
    for p, t in zip(lr.params, theta):  # bit-exact restore after every task
        assert torch.equal(p.detach(), t)
    tasks = lr.sampler.meta_batch(0, META.meta_batch_size)
    ref = [torch.zeros_like(t) for t in theta]
    for slot, task in enumerate(tasks):  # plain torch: copy, k SGD steps, query grad at phi
        m = copy.deepcopy(lr.model).train()
        sup, qry = lr.batch(0, slot, task, "support"), lr.batch(0, slot, task, "query")
        for _ in range(META.inner_steps):
            m.zero_grad()
            m(**_hf(sup)).loss.backward()  # transformers' own shifted, masked token-mean loss
            with torch.no_grad():
                for p in m.parameters():
                    p -= META.inner_lr * p.grad
        m.zero_grad()
        m(**_hf(qry)).loss.backward()
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
    assert row["lr"] == META.outer_lr  # cosine without warm-up starts at the peak
    sampled = set(lr.sampler.meta_batch(0, 2))
    for s in SUBJECTS:
        gap = row[f"{s}/adaptation_gap"]
        assert math.isnan(gap) == (s not in sampled)
    assert row["meta/loss"] == row["loss"]
    assert row["meta/avg_adaptation_gap"] == pytest.approx(row["meta/query_loss_pre"] - row["meta/loss"])
    assert row["meta/avg_adaptation_gap"] > 0  # inner SGD lowers the query loss of these easy tasks
    k = META.inner_steps  # the budget every method shares: k + 1 gradient passes per task, their tokens
    assert row["grad_passes"] == META.meta_batch_size * (k + 1)
    assert 0 < row["train_tokens"] < row["tokens"]


def test_first_warmup_step_leaves_the_weights(env):
    """With warm-up the first outer step has lr 0: AdamW (no weight decay) changes nothing; the second does."""
    lr = learner(env, settings(warmup_steps=1))
    before = [p.detach().clone() for p in lr.params]
    assert lr.step(0)["lr"] == 0.0
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, lr.params))
    assert lr.step(1)["lr"] == pytest.approx(META.outer_lr)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, lr.params))


def test_meta_lora_trains_only_the_adapter(env):
    lr = learner(env, settings(lora=LORA))
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


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def full_run(env):
    """The uninterrupted 3-step run (offline W&B) that the resumed runs must reproduce."""
    out = env["root"] / "a/checkpoints/final"
    train(str(env["model"]), str(env["tasks"]), SUBJECTS, META, 5, out, env["root"] / "a/m.parquet",
          WandbSettings(mode="offline", project="test"))
    return {"out": out, "metrics": env["root"] / "a/m.parquet"}


def test_full_run_metrics_and_checkpoints(env, full_run):
    ck = full_run["out"].parent
    assert list(ck.glob("wandb/offline-run-*"))
    rows = pq.read_table(full_run["metrics"]).to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"meta/loss", "meta/avg_adaptation_gap", "algebra/adaptation_gap", "lr", "tokens"} <= set(rows[0])
    # transformers' cosine without warm-up over 3 outer steps, as recorded before each step
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)])
    # a checkpoint after every step but the last, each complete (marker written last) with the rows so far
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2]
    for s, p in checkpoints.numbered(ck):
        assert checkpoints.is_complete(p) and checkpoints.marker(p)["step"] == s
        assert checkpoints.marker(p)["kind"] == "fomaml" and "state.json" in checkpoints.marker(p)["files"]
        assert _steps(p / METRICS_FILE) == list(range(1, s + 1))
        assert json.loads((p / "state.json").read_text())["step"] == s
    assert checkpoints.is_complete(full_run["out"])
    base = _weights(env["model"])
    assert any(not torch.equal(_weights(full_run["out"])[k], base[k]) for k in base)
    # the default divergence guard watched the run and tripped nothing
    assert META.guard == GuardSettings(patience=3, zero_grad_norm=0.0, param_norm_ratio=10.0)
    norms = [r["param_norm"] for r in rows]
    assert all(math.isfinite(n) and n < 10 * norms[0] for n in norms) and len(set(norms)) == 3, norms


def test_stop_and_resume_gives_the_same_run(env, full_run, tmp_path, caplog):
    """Stopped after 2 steps (as if preempted): no final model, no train_metrics; the checkpoints are pruned
    to keep_checkpoints. The rerun resumes at step 2 and ends with the full run's weights and every row."""
    caplog.set_level(logging.INFO)
    meta = settings(keep_checkpoints=1)  # not part of the run's identity: it still resumes the same run
    out, metrics = tmp_path / "b/checkpoints/final", tmp_path / "b/m.parquet"
    kw = dict(model_dir=str(env["model"]), tasks_dir=str(env["tasks"]), subjects=SUBJECTS, cfg=meta, seed=5,
              out=out, metrics=metrics, wandb=OFF)
    train(stop_after=2, **kw)
    assert not out.exists() and not metrics.exists()
    assert [p.name for p in sorted(out.parent.iterdir())] == ["2"]  # step 1 pruned
    assert _steps(out.parent / "2" / METRICS_FILE) == [1, 2]
    caplog.clear()
    train(**kw)
    assert f"resuming from {out.parent / '2'} (step 2)" in caplog.text
    wa, wb = _weights(full_run["out"]), _weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    ma, mb = pq.read_table(full_run["metrics"]).to_pylist(), pq.read_table(metrics).to_pylist()
    assert [r["step"] for r in mb] == [1, 2, 3]
    for key in ("meta/loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in mb] == pytest.approx([r[key] for r in ma], abs=1e-6), key


@pytest.mark.parametrize("damage", ["no_marker", "half_a_shard"])
def test_incomplete_checkpoint_is_skipped_on_resume(env, full_run, tmp_path, caplog, damage):
    """A checkpoint without its marker (cut during its save), its weights shard also cut in half in one variant,
    is skipped with a warning; the run resumes from the one before and still ends with the full run's weights."""
    caplog.set_level(logging.INFO)
    out, metrics = tmp_path / "c/checkpoints/final", tmp_path / "c/m.parquet"
    kw = dict(model_dir=str(env["model"]), tasks_dir=str(env["tasks"]), subjects=SUBJECTS, cfg=META, seed=5,
              out=out, metrics=metrics, wandb=OFF)
    train(stop_after=2, **kw)
    assert [s for s, _ in checkpoints.numbered(out.parent)] == [1, 2]
    (out.parent / "2" / checkpoints.MARKER).unlink()
    if damage == "half_a_shard":
        (shard,) = (out.parent / "2").glob("*.distcp")  # the DCP file of model and optimizer
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    caplog.clear()
    train(**kw)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "skipping checkpoint" in r.getMessage()]
    assert warned and str(out.parent / "2") in warned[0].getMessage() and "incomplete" in warned[0].getMessage()
    assert f"resuming from {out.parent / '1'} (step 1)" in caplog.text
    wa, wc = _weights(full_run["out"]), _weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=1e-6, rtol=0)
    assert _steps(metrics) == [1, 2, 3]
    assert pq.read_table(metrics).column("meta/loss").to_pylist() == pytest.approx(
        pq.read_table(full_run["metrics"]).column("meta/loss").to_pylist(), abs=1e-6)


def test_other_runs_checkpoints_are_not_resumed(env, full_run, tmp_path, caplog):
    """A checkpoint of another run (different meta settings) is left alone: the run starts over."""
    caplog.set_level(logging.INFO)
    ck = tmp_path / "d/checkpoints"
    shutil.copytree(full_run["out"].parent / "2", ck / "2")
    out = ck / "final"
    train(str(env["model"]), str(env["tasks"]), SUBJECTS, settings(outer_steps=2), 5, out, tmp_path / "d/m.parquet",
          OFF)
    assert "resuming from" not in caplog.text
    assert _steps(tmp_path / "d/m.parquet") == [1, 2]
    assert json.loads((ck / "2" / "state.json").read_text())["spec"]["meta"]["outer_steps"] == 3  # left alone


def test_a_run_made_to_diverge_trips_the_guard(env, tmp_path):
    """outer_lr 1e4 after a warm-up step at lr 0 (the start norm): from step 2 the weights' norm is ~3e5 times
    its start. The guard stops at step 4 naming checkpoint 1, the last written before step 2, whose weights are
    finite; no final model, no train_metrics. (zero_grad is switched off: from step 3 the meta-gradient is 0 too.)
    With the default keep_checkpoints 2, pruning would delete checkpoint 1 at step 3: it spares the checkpoint
    the guard would name while a condition holds, so 1, 2 and 3 are on disk."""
    meta = settings(outer_steps=6, warmup_steps=1, outer_lr=1e4, checkpoint_every=1, guard={"zero_grad_norm": None})
    assert meta.keep_checkpoints == 2
    out, metrics = tmp_path / "checkpoints/final", tmp_path / "m.parquet"
    ck = out.parent
    with pytest.raises(DivergenceError) as e:
        train(str(env["model"]), str(env["tasks"]), SUBJECTS, meta, 5, out, metrics, OFF)
    assert re.fullmatch(r"diverged at step 4: the weights' norm grew to \S+, \S+x its start \S+ \(limit 10x\) for 3 "
                        r"steps \(since step 2; meta\.guard\.param_norm_ratio\); last good checkpoint: "
                        + re.escape(str(ck / "1")), str(e.value)), str(e.value)
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2, 3] and not out.exists() and not metrics.exists()
    rows = pq.read_table(ck / "3" / METRICS_FILE).to_pylist()
    assert rows[0]["lr"] == 0.0 and all(r["param_norm"] > 1e4 * rows[0]["param_norm"] for r in rows[1:]), rows
    # the named checkpoint (DCP shards: checkpoints.weights_finite cannot read them) loads with finite weights
    lr = learner(env, meta)
    assert load_resume(ck / "1", lr.model, lr.opt, DistContext())["step"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in lr.model.parameters())
    assert lr.param_norm() == pytest.approx(rows[0]["param_norm"], rel=1e-6)


def test_cli_trains_and_merges_meta_lora(env, tmp_path):
    """`rlmeta train-fomaml --meta JSON`, meta-LoRA: a merged full checkpoint in which only the adapted
    projections differ from the base, plus the unmerged adapter."""
    meta = settings(outer_steps=2, lora=LORA)
    out = tmp_path / "e/final"
    assert main(["train-fomaml", "--model", str(env["model"]), "--tasks-dir", str(env["tasks"]),
                 "--subjects", *SUBJECTS, "--meta", meta.model_dump_json(), "--seed", "5", "--out", str(out),
                 "--metrics", str(tmp_path / "e/m.parquet"), "--wandb", '{"mode": "disabled"}']) == 0
    assert _steps(tmp_path / "e/m.parquet") == [1, 2]
    wc, base = _weights(out), _weights(env["model"])
    assert set(wc) == set(base)
    for k in base:
        same = torch.equal(wc[k], base[k])
        assert same != ("q_proj" in k or "v_proj" in k), k
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    assert (out / "meta_adapter").is_dir()


def test_cli_rejects_bad_meta_settings(env, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-fomaml", "--model", str(env["model"]), "--tasks-dir", str(env["tasks"]), "--subjects", *SUBJECTS,
              "--meta", '{"nproc": 2, "shard_size": 3}', "--out", str(tmp_path / "f"),
              "--metrics", str(tmp_path / "f.parquet")])
    assert e.value.code == 2
    assert "shard_size 3 must divide nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
