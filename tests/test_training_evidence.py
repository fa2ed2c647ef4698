"""Evidence written during RL training, on both trainers (``rlmeta.rl.evidence``): the held-out evaluation curve
(one row per evaluation step, values equal to scoring the policy's greedy completions), the rollouts table (every
training completion with its rewards and advantage; files per checkpoint interval), the entropy column, and all
three the same after a resume from an earlier checkpoint as in the uninterrupted run."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmeta.rl.evidence import CHUNKS_DIR, RolloutLog, read_rollouts, rollout_records
from rlmeta.rl.objectives import group_advantages
from rlmeta.settings import RLJob, WandbSettings
from rlmeta.tables import rollouts_schema
from rlmeta.testing.models import build_trainer_model, write_count_prompts
from rlmeta.testing.rewards import digit_share, registered

OFF = WandbSettings(mode="disabled")
N_TRAIN, N_EVAL = 6, 3


@pytest.fixture(scope="module", autouse=True)
def toy_reward():
    with registered("toy_digits", digit_share, "share of digit characters"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_trainer_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_count_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", N_TRAIN, N_EVAL)


def job(backend: str, **train) -> RLJob:
    t = {"steps": 6, "batch_prompts": 2, "group_size": 4, "learning_rate": 1e-2, "max_new_tokens": 6,
         "checkpoint_every": 2, "updates_per_batch": 1, "eval_every": 2, "eval_prompts": N_EVAL, **train}
    return RLJob.model_validate({"algorithm": "grpo", "rewards": {"toy_digits": 1.0}, "train": t,
                                 "backend": backend})


def trainer(backend: str):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        from rlmeta.rl.mlx_trainer import train_mlx

        return train_mlx
    from rlmeta.rl.trl_trainer import train_trl

    return train_trl


def train(backend, tiny, prompts, out: Path, j: RLJob):
    trainer(backend)(tiny, prompts, j, out / "checkpoints", out / "train_metrics.parquet", OFF, seed=3,
                     curve_path=out / "eval_curve.parquet", rollouts_path=out / "rollouts")
    return (pq.read_table(out / "eval_curve.parquet").to_pylist(), read_rollouts(out / "rollouts"),
            pq.read_table(out / "train_metrics.parquet").to_pylist())


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "step_seconds")} for r in rows]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def runs(request, tiny, prompts, tmp_path_factory):
    """One uninterrupted run, and the same run resumed from its step-2 checkpoint (the later checkpoints and the
    outputs deleted, as after a kill; the rollout chunk of steps 2-3 left behind on disk)."""
    backend = request.param
    if backend == "torch":
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(n))
    j = job(backend)
    out = tmp_path_factory.mktemp(f"evidence-{backend}")
    full = train(backend, tiny, prompts, out, j)
    files = sorted(p.name for p in (out / "rollouts").iterdir())
    ckpts = out / "checkpoints"
    assert (ckpts / CHUNKS_DIR / "steps-000002-000003.parquet").exists()
    for p in ckpts.iterdir():
        if p.is_dir() and p.name not in ("2", "checkpoint-2", CHUNKS_DIR):
            shutil.rmtree(p)
    for name in ("eval_curve.parquet", "train_metrics.parquet"):
        (out / name).unlink()
    shutil.rmtree(out / "rollouts")
    resumed = train(backend, tiny, prompts, out, j)
    return backend, j, out, full, resumed, files


def test_eval_curve_has_one_row_per_evaluation_step(runs):
    _, j, _, (curve, _, _), _, _ = runs
    assert [r["step"] for r in curve] == [0, 2, 4, 6]
    for r in curve:
        assert r["n_prompts"] == N_EVAL
        assert 0.0 <= r["reward"] <= 1.0 and r["reward"] == pytest.approx(r["reward/toy_digits"])
        assert 1 <= r["completion_len_mean"] <= j.train.max_new_tokens
        assert 0.0 <= r["truncated_frac"] <= 1.0


def test_last_evaluation_equals_scoring_the_final_policy(runs, prompts):
    """The step-6 row is the final policy's greedy completions on the first eval prompts, scored."""
    from rlmeta.policy import load_policy
    from rlmeta.prompts import eval_rows

    backend, j, out, (curve, _, _), _, _ = runs
    policy = load_policy(out / "checkpoints" / "final", backend)
    rows = eval_rows(prompts, N_EVAL)
    gens = policy.generate(policy.encode_prompts([r["prompt"] for r in rows]), n=1, temperature=0.0,
                           max_new_tokens=j.train.max_new_tokens)
    assert curve[-1]["reward"] == pytest.approx(np.mean([digit_share(g.text) for g in gens]), abs=1e-9)
    assert curve[-1]["completion_len_mean"] == pytest.approx(np.mean([len(g.token_ids) for g in gens]))


def test_rollouts_hold_every_training_completion(runs, prompts):
    _, j, _, (_, rollouts, metrics), _, files = runs
    t = j.train
    assert files == ["steps-000000-000001.parquet", "steps-000002-000003.parquet", "steps-000004-000005.parquet"]
    assert rollouts.schema.equals(rollouts_schema(["toy_digits"]), check_metadata=False)
    rows = rollouts.to_pylist()
    assert len(rows) == t.steps * t.batch_prompts * t.group_size
    assert sorted({r["step"] for r in rows}) == list(range(t.steps))
    train_ids = {f"p{i}" for i in range(N_TRAIN)}
    for r in rows:
        assert r["prompt_id"] in train_ids
        assert r["reward"] == pytest.approx(digit_share(r["completion"]))
        assert r["reward/toy_digits"] == r["reward"]
        assert 1 <= r["n_tokens"] <= t.max_new_tokens
        assert not r["truncated"] or r["n_tokens"] == t.max_new_tokens
    for step in range(t.steps):
        batch = [r for r in rows if r["step"] == step]
        assert [(r["group"], r["sample_idx"]) for r in batch] == [(g, k) for g in range(t.batch_prompts)
                                                                 for k in range(t.group_size)]
        assert len({r["prompt_id"] for r in batch if r["group"] == 0}) == 1  # a group is one prompt's samples
        expected = group_advantages(np.array([r["reward"] for r in batch]), t.group_size, t.scale_rewards)
        np.testing.assert_allclose([r["advantage"] for r in batch], expected, rtol=1e-2, atol=1e-3)
        # the step's train_metrics row reports the batch's mean reward
        row = next(m for m in metrics if m["step"] == step + 1)
        assert row["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in batch]), abs=1e-6)


def test_entropy_column_is_filled(runs):
    _, _, _, (_, _, metrics), _, _ = runs
    values = [m["entropy"] for m in metrics]
    assert all(v is not None and 0.0 < v < np.log(320) for v in values), values


def test_resumed_run_has_the_evidence_of_the_uninterrupted_one(runs):
    _, _, out, (curve, rollouts, metrics), (curve2, rollouts2, metrics2), files = runs
    assert without_seconds(curve2) == without_seconds(curve)
    assert rollouts2.to_pylist() == rollouts.to_pylist()
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == files
    assert [m["step"] for m in metrics2] == [m["step"] for m in metrics]


def test_evaluation_and_rollouts_can_be_switched_off(tiny, prompts, tmp_path):
    pytest.importorskip("mlx.core")
    curve, rollouts, _ = train("mlx", tiny, prompts, tmp_path, job("mlx", steps=2, eval_every=None,
                                                                    log_rollouts=False))
    assert curve == [] and rollouts is None
    assert list((tmp_path / "rollouts").iterdir()) == []


def test_resume_drops_rows_at_or_after_the_resumed_step(tmp_path):
    """A chunk that straddles the resume step keeps its earlier rows; later chunks go."""
    log = RolloutLog(["r"], tmp_path / CHUNKS_DIR)

    def batch(step):
        return rollout_records(step, ["p"], [0], [0], ["x"], [1.0], {"r": [1.0]}, [0.0], [1], [False])

    for step in range(5):
        log.add(batch(step))
        if step in (1, 4):
            log.checkpoint()
    assert sorted(p.name for p in (tmp_path / CHUNKS_DIR).iterdir()) == [
        "steps-000000-000001.parquet", "steps-000002-000004.parquet"]
    log.restore(3)
    log.add(batch(3))
    written = log.write(tmp_path / "out")
    assert [p.name for p in written] == ["steps-000000-000001.parquet", "steps-000002-000002.parquet",
                                         "steps-000003-000003.parquet"]
    table = read_rollouts(tmp_path / "out")
    assert table.column("step").to_pylist() == [0, 1, 2, 3]
    assert isinstance(table, pa.Table)


def test_mlx_run_logs_evaluations_and_rollout_tables_to_wandb(tiny, prompts, tmp_path):
    """An offline W&B run gets every evaluation as eval/... at its step and one rollouts table per checkpoint
    interval (and one for the rows after the last checkpoint)."""
    import json

    pytest.importorskip("mlx.core")
    from rlmeta.rl.mlx_trainer import train_mlx
    from rlmeta.testing.wandb_files import wandb_records_when_flushed

    out = tmp_path / "checkpoints"
    train_mlx(tiny, prompts, job("mlx", steps=3, checkpoint_every=2), out, tmp_path / "m.parquet",
              WandbSettings(mode="offline", project="rlmeta-test"), seed=3, curve_path=tmp_path / "c.parquet",
              rollouts_path=tmp_path / "rollouts")
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in wandb_records_when_flushed(run_file) if r.WhichOneof("record_type") == "history"]
    evals = {h["_step"]: h["eval/reward"] for h in history if "eval/reward" in h}
    curve = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert evals == {r["step"]: pytest.approx(r["reward"]) for r in curve} and sorted(evals) == [0, 2, 3]
    tables = [(h["_step"], h["rollouts/_type"], h["rollouts/nrows"]) for h in history if "rollouts/nrows" in h]
    # steps 0-1 at the step-2 checkpoint, then step 2's at the end (2 prompts x 4 samples a step)
    assert tables == [(2, "table-file", 2 * 8), (3, "table-file", 8)]
