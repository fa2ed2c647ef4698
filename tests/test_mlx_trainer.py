"""MLX GRPO/GSPO trainer: it learns a known task, resumes exactly, stops runs that diverge (NaN, and each
condition of the divergence guard on a run made to diverge), saves a shared checkpoint.

The toy task: a tiny random Qwen3 (BPE vocabulary of ~300 tokens, so each of the 10 single-digit
tokens starts near 1/300 per position) is rewarded by the share of digits in its completion. The
answer is known (emit digits only: reward 1.0); the base policy scores ~0.03.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

mx = pytest.importorskip("mlx.core")

from rlmeta import checkpoints  # noqa: E402
from rlmeta.cli import main  # noqa: E402
from rlmeta.io import write_records  # noqa: E402
from rlmeta.rl import mlx_state  # noqa: E402
from rlmeta.rl.mlx_trainer import MLXTrainer, train_mlx  # noqa: E402
from rlmeta.schedules import mlx_schedule  # noqa: E402
from rlmeta.settings import ROOT, ModelBuild, RLGuardSettings, RLJob, WandbSettings  # noqa: E402
from rlmeta.tables import PROMPTS  # noqa: E402
from rlmeta.testing.rewards import digit_share, registered  # noqa: E402
from rlmeta.tracking import METRICS_FILE, DivergenceGuard, NonFiniteMetricError  # noqa: E402

TINY = ModelBuild(tokenizer="bpe", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  intermediate_size=64)
OFF = WandbSettings(mode="disabled")


@pytest.fixture(scope="module", autouse=True)
def toy_reward():
    with registered("toy_digits", digit_share, "share of digit characters"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlmeta.models.build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", TINY, [ROOT / "resources/gsm8k/train.jsonl"], 0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt_id": f"p{i}", "experiment": "toy", "item_id": f"i{i}", "task": f"t{i}",
             "split": "train" if i < 8 else "eval",
             "prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": f"go {i}"}],
             "reference": None, "reference_completion": None} for i in range(10)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    write_records(path, rows, PROMPTS)
    return path


def experiment(algorithm="grpo", reward=1.0, **train) -> RLJob:
    t = {"steps": 30, "batch_prompts": 4, "group_size": 8, "learning_rate": 1e-2, "max_new_tokens": 8,
         "checkpoint_every": 1000, **train}
    return RLJob.model_validate({"algorithm": algorithm, "rewards": {"toy_digits": reward}, "reward_params": {},
                                 "train": t, "backend": "mlx"})


def run(tiny, prompts, out: Path, job: RLJob, **kw) -> list[dict] | None:
    """Train; the train_metrics rows, or None when the run left no train_metrics.parquet (stopped early)."""
    train_mlx(tiny, prompts, job, out / "checkpoints", out / "train_metrics.parquet", OFF, seed=0, **kw)
    path = out / "train_metrics.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else None


def checkpoint_rows(ckpt: Path) -> list[dict]:
    """The train_metrics rows a checkpoint carries."""
    return pq.read_table(ckpt / METRICS_FILE).to_pylist()


def drop_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


def final_weights(out: Path) -> dict:
    return mx.load(str(out / "checkpoints" / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


@pytest.fixture(scope="module", params=["grpo", "gspo"])
def learned(request, tiny, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"learn_{request.param}")
    # on-policy GSPO with dapo aggregation has GRPO's gradient: give it the off-policy path and another loss
    extra = {"updates_per_batch": 2, "loss_type": "grpo"} if request.param == "gspo" else {}
    return request.param, out, run(tiny, prompts, out, experiment(request.param, **extra))


def test_learns_the_toy_task(learned):
    algorithm, _, rows = learned
    r = [row["reward/toy_digits"] for row in rows]
    before, after = np.mean(r[:3]), np.mean(r[-3:])
    print(f"{algorithm}: reward {before:.3f} -> {after:.3f} in {len(r)} steps")
    assert before < 0.15 and after > 0.8, r
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert all(row["reward_mean"] == row["reward/toy_digits"] for row in rows)
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0 and all(row["kl"] is None for row in rows)
    # the default divergence guard watched this run (every condition on) and tripped nothing
    assert experiment(algorithm).train.guard == RLGuardSettings(patience=3, zero_grad_norm=0.0, param_norm_ratio=10.0,
                                                                reward_floor=True)
    norms = [row["param_norm"] for row in rows]
    assert all(math.isfinite(n) and n < 10 * norms[0] for n in norms), norms


def test_negated_reward_does_not_improve(tiny, prompts, tmp_path):
    rows = run(tiny, prompts, tmp_path, experiment(reward=-1.0, steps=12))
    r = [row["reward/toy_digits"] for row in rows]
    assert np.mean(r[-3:]) < 0.03 and np.mean(r[-3:]) <= np.mean(r[:3]), r
    assert all(row["reward_mean"] == -row["reward/toy_digits"] for row in rows)


def assert_transformers_agrees(final: Path) -> None:
    """``final`` opens in mlx_lm and transformers, with the same completion log-probs (1e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlmeta.policy import load_policy

    policy = load_policy(final, "mlx")
    gens = policy.generate([[{"role": "user", "content": "go"}]], n=3, max_new_tokens=6, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    for g, lp in zip(gens, policy.logprobs([g.prompt_ids for g in gens], [g.token_ids for g in gens])):
        with torch.no_grad():
            logits = hf(torch.tensor([g.prompt_ids + g.token_ids])).logits[0, len(g.prompt_ids) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lp, ref, atol=1e-4)
        np.testing.assert_allclose(lp, g.logprobs, atol=1e-4)  # sampling and teacher forcing agree


def test_final_checkpoint_opens_in_transformers_with_same_logprobs(learned):
    assert_transformers_agrees(learned[1] / "checkpoints" / "final")


@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_second_update_moves_the_importance_ratio(tiny, prompts, algorithm):
    tr = MLXTrainer(tiny, prompts, experiment(algorithm, steps=2, updates_per_batch=2), seed=0)
    out = tr.train_step()
    first, second = out["updates"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["clip_ratio"] == 0.0
    assert second["clip_ratio"] > 0 or abs(second["ratio"] - 1.0) > 1e-4, second
    if algorithm == "gspo":
        assert second["clip_ratio"] > 0, second  # eps 3e-4: a sequence ratio moved past the band
    lr = mlx_schedule("constant", 1e-2, 0, 4)
    assert [u["lr"] for u in out["updates"]] == [lr(0).item(), lr(1).item()] and out["lr"] == lr(1).item()
    assert out["lr"] == pytest.approx(1e-2, rel=1e-7) and math.isfinite(out["loss"])


@pytest.mark.parametrize("schedule,warmup", [("cosine", 1), ("linear", 0)])
def test_logged_lr_is_the_schedule_value_of_that_update(tiny, prompts, schedule, warmup):
    steps, mu = 4, 2
    tr = MLXTrainer(tiny, prompts, experiment(steps=steps, batch_prompts=2, group_size=2, updates_per_batch=mu,
                                              lr_schedule=schedule, warmup_steps=warmup), seed=0)
    lr = mlx_schedule(schedule, 1e-2, warmup * mu, steps * mu)
    rows = [tr.train_step() for _ in range(steps)]
    updates = [u["lr"] for r in rows for u in r["updates"]]
    assert updates == [lr(i).item() for i in range(steps * mu)]  # update i ran at the schedule's lr(i)
    assert [r["lr"] for r in rows] == [lr(r["step"] * mu - 1).item() for r in rows]  # a row: its last update's
    if warmup:
        assert updates[0] == 0.0 and updates[1:3] == pytest.approx([0.5e-2, 1e-2], rel=1e-7)  # warm-up from 0
    else:
        assert updates[0] == pytest.approx(1e-2, rel=1e-7) and updates[-1] == pytest.approx(1e-2 / 8, rel=1e-6)


def test_kl_to_reference_grows_with_beta(tiny, prompts):
    tr = MLXTrainer(tiny, prompts, experiment(steps=3, beta=0.1), seed=0)
    kls = [tr.train_step()["kl"] for _ in range(3)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[2] > 0, kls


def test_ued_selects_prompts_and_learns_their_scores(tiny, prompts):
    tr = MLXTrainer(tiny, prompts, experiment(steps=3, ued={"enabled": True, "staleness_weight": 0.3}), seed=0)
    picked = [tr.train_step()["indices"] for _ in range(3)]
    assert all(len(set(p)) == 4 for p in picked)
    state, seen = tr.sampler.state_dict(), set().union(*picked)
    assert state["step"] == 3 and len(seen) > 4  # unseen prompts rank first
    assert {i for i, s in enumerate(state["scores"]) if s is not None} == seen


@pytest.mark.parametrize("variant", ["full_ued_kl", "lora_gspo"])
def test_resume_ends_where_an_uninterrupted_run_does(tiny, prompts, tmp_path, variant):
    if variant == "full_ued_kl":
        exp = experiment(steps=4, checkpoint_every=2, updates_per_batch=2, beta=0.05, ued={"enabled": True},
                         lr_schedule="cosine", warmup_steps=1)
    else:
        exp = experiment("gspo", steps=4, checkpoint_every=2, updates_per_batch=2, learning_rate=3e-2,
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    straight = run(tiny, prompts, tmp_path / "a", exp)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    # "killed" after step 3: no final model and no train_metrics.parquet (written when training ends), but
    # the last checkpoint (step 2) carries the rows so far
    assert run(tiny, prompts, tmp_path / "b", exp, stop_after=3) is None
    ck = tmp_path / "b/checkpoints"
    assert not (ck / "final").exists() and not (tmp_path / "b/train_metrics.parquet").exists()
    assert [s for s, _ in checkpoints.numbered(ck)] == [2]
    assert drop_seconds(checkpoint_rows(ck / "2")) == drop_seconds(straight[:2])
    resumed = run(tiny, prompts, tmp_path / "b", exp)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # every step, the restored ones included
    assert drop_seconds(resumed) == drop_seconds(straight)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert_same_weights(a, b)
    assert [s for s, _ in checkpoints.numbered(ck)] == [2, 4]
    assert drop_seconds(checkpoint_rows(ck / "4")) == drop_seconds(straight)
    state = json.loads((ck / "4" / mlx_state.STATE_FILE).read_text())
    assert state["step"] == 4 and state["spec"]["job"] == exp.model_dump(mode="json")
    assert checkpoints.marker(ck / "4")["step"] == 4 and checkpoints.is_complete(ck / "4")
    if variant == "lora_gspo":  # merged: no adapter names in the final weights
        assert not any("lora" in k for k in a) and (ck / "2/adapter").is_dir()
        assert_transformers_agrees(ck / "final")


@pytest.fixture(scope="module")
def every_step_run(tiny, prompts, tmp_path_factory):
    """An uninterrupted 4-step run that checkpoints every step (the reference of the resume tests)."""
    job = experiment(steps=4, batch_prompts=2, group_size=4, checkpoint_every=1, updates_per_batch=2)
    out = tmp_path_factory.mktemp("every_step")
    return job, out, run(tiny, prompts, out, job)


@pytest.mark.parametrize("damage", ["copy_without_marker", "truncated_weights", "listed_file_missing"])
def test_incomplete_checkpoint_is_skipped_with_a_warning(tiny, prompts, tmp_path, every_step_run, caplog, damage):
    job, ref_out, straight = every_step_run
    assert run(tiny, prompts, tmp_path, job, stop_after=2) is None
    ck = tmp_path / "checkpoints"
    fake = ck / "3"  # the newest checkpoint under the next step's name, as if cut during its save
    shutil.copytree(ck / "2", fake)
    if damage == "listed_file_missing":  # marker kept, a file it lists gone
        (fake / mlx_state.OPTIMIZER_FILE).unlink()
    else:
        (fake / checkpoints.MARKER).unlink()
    if damage == "truncated_weights":
        weights = fake / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    caplog.set_level(logging.INFO)
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2]
    assert f"skipping checkpoint {fake}: incomplete" in caplog.text
    caplog.clear()

    resumed = run(tiny, prompts, tmp_path, job)
    assert f"skipping checkpoint {fake}: incomplete" in caplog.text
    assert f"resuming {ck / '2'} at step 2" in caplog.text
    assert drop_seconds(resumed) == drop_seconds(straight)
    assert_same_weights(final_weights(tmp_path), final_weights(ref_out))
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2, 3, 4] and checkpoints.is_complete(fake)


def test_poisoned_learning_rate_stops_and_keeps_the_last_good_checkpoint(tiny, prompts, tmp_path):
    # warm-up: step 1 runs at lr 0, step 2 at 1e30 (finite but huge weights: the param_norm condition starts
    # to hold), step 3 overflows them. The good checkpoint is the last one written before step 2: checkpoints/1.
    exp = experiment(steps=5, learning_rate=1e30, weight_decay=0.1, warmup_steps=1, checkpoint_every=1)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteMetricError) as e:
        run(tiny, prompts, tmp_path, exp)
    msg = str(e.value)
    assert re.fullmatch(r"non-finite \S.* at step 3: .*; last good checkpoint: (.*)", msg), msg
    assert msg.endswith(f"; last good checkpoint: {ckpts / '1'}"), msg
    assert "param_norm" in msg.split(" at step 3")[0], msg  # the weights themselves overflowed
    assert [s for s, _ in checkpoints.numbered(ckpts)] == [1, 2] and not (ckpts / "final").exists()
    assert checkpoints.weights_finite(ckpts / "1") is True
    assert checkpoints.weights_finite(ckpts / "2") is True  # finite, but written after things went wrong
    # train_metrics.parquet is written when training ends: a stopped run leaves the rows in its checkpoints
    assert not (tmp_path / "train_metrics.parquet").exists()
    assert [r["step"] for r in checkpoint_rows(ckpts / "1")] == [1]
    rows = checkpoint_rows(ckpts / "2")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e30)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    # the norm is finite while the weights are, and past the guard's 10x limit from step 2
    assert math.isfinite(rows[1]["param_norm"]) and rows[1]["param_norm"] > 1e20 * rows[0]["param_norm"]
    assert rows[0]["param_norm"] == pytest.approx(_norm(mx.load(str(ckpts / "1" / "model.safetensors"))), rel=1e-5)
    assert rows[1]["param_norm"] == pytest.approx(_norm(mx.load(str(ckpts / "2" / "model.safetensors"))), rel=1e-5)


def _norm(weights: dict) -> float:
    """The L2 norm of every weight, in float64 (NumPy)."""
    return math.sqrt(sum(float((np.asarray(v.astype(mx.float32), dtype=np.float64) ** 2).sum())
                         for v in weights.values()))


GUARD_OFF = {"zero_grad_norm": None, "param_norm_ratio": None, "reward_floor": False}
DIVERGING = {
    # condition: (train settings that make the run diverge, the guard settings, what the message says)
    # lr 1e4 (as measured in the issue): from step 2 the gradient is 0 although rewards still differ within groups
    "zero_grad": ({"learning_rate": 1e4}, {**GUARD_OFF, "zero_grad_norm": 0.0},
                  r"the gradient norm stayed at 0 \(<= 0\) while the rewards still differed within groups"),
    # warm-up: step 1 runs at lr 0 (the start norm), step 2 at 1e4 grows the weights' norm ~1e5 times
    "param_norm": ({"learning_rate": 1e4, "warmup_steps": 1}, {**GUARD_OFF, "param_norm_ratio": 10.0},
                   r"the weights' norm grew to \S+, \S+x its start \S+ \(limit 10x\)"),
    # three new tokens at lr 100: from step 2 every completion is the same digit-free text (reward 0, the floor).
    # zero_grad stays on: its gradient is 0 too, but every group's rewards are equal (no signal), so it must not trip
    "reward_floor": ({"learning_rate": 100, "max_new_tokens": 3}, {**GUARD_OFF, "zero_grad_norm": 0.0,
                                                                   "reward_floor": True},
                     r"the mean rollout reward fell to its floor 0 after having been above it"),
}


@pytest.mark.parametrize("condition", list(DIVERGING))
def test_a_run_made_to_diverge_trips_the_guard(tiny, prompts, tmp_path, capsys, restore_logging, condition):
    """Through the command line: exit 2 with the error in one line naming the step, the condition, its settings
    key and the last checkpoint written before the condition started to hold (step 2): checkpoints/1, finite.
    Nothing is written as final."""
    train, guard, says = DIVERGING[condition]
    job = experiment(steps=6, checkpoint_every=1, guard=guard, **train)
    ck, metrics = tmp_path / "checkpoints", tmp_path / "train_metrics.parquet"
    argv = ["train-mlx", "--model", str(tiny), "--prompts", str(prompts), "--job", job.model_dump_json(),
            "--out", str(ck), "--metrics", str(metrics), "--wandb", '{"mode": "disabled"}']
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    key = f"train.guard.{DivergenceGuard.KEYS[condition]}"
    assert re.fullmatch(rf"rlmeta train-mlx: error: diverged at step 4: {says} for 3 steps \(since step 2; "
                        rf"{re.escape(key)}\); last good checkpoint: {re.escape(str(ck / '1'))}", line), line
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2, 3]  # the check runs before the step's checkpoint
    assert not (ck / "final").exists() and not metrics.exists()
    assert checkpoints.weights_finite(ck / "1") is True
    rows = checkpoint_rows(ck / "3")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first, later = rows[0], rows[1:]
    if condition == "zero_grad":
        assert first["grad_norm"] > 0 and all(r["grad_norm"] == 0 and r["zero_std_frac"] < 1 for r in later), rows
    elif condition == "param_norm":
        assert first["lr"] == 0 and all(r["param_norm"] > 1e4 * first["param_norm"] for r in later), rows
    else:
        assert first["reward_mean"] > 0 and all(r["reward_mean"] == 0 for r in later), rows
        assert all(r["grad_norm"] == 0 and r["zero_std_frac"] == 1 for r in later), rows  # not a zero_grad trip


@pytest.fixture
def restore_logging():
    """``rlmeta.cli.main`` sets up logging afresh (``basicConfig(force=True)``): give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli(tiny, prompts, tmp_path, capsys, restore_logging):
    with pytest.raises(SystemExit) as e:
        main(["train-mlx", "--help"])
    assert e.value.code == 0
    assert "--job" in capsys.readouterr().out
    job = experiment(steps=1, batch_prompts=2, group_size=2, checkpoint_every=1).model_dump_json()
    argv = ["train-mlx", "--model", str(tiny), "--prompts", str(prompts), "--job", job, "--out", str(tmp_path / "ck"),
            "--metrics", str(tmp_path / "m.parquet"), "--seed", "3", "--wandb", '{"mode": "disabled"}']
    assert main(argv) == 0
    assert (tmp_path / "ck/final/model.safetensors").exists() and (tmp_path / "ck/1" / mlx_state.STATE_FILE).exists()
    assert [r["step"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist()] == [1]
    assert json.loads((tmp_path / "ck/1" / mlx_state.STATE_FILE).read_text())["spec"]["seed"] == 3
    err = capsys.readouterr().err
    assert "step 1/1 reward=" in err and "INFO rlmeta.rl.mlx_trainer: saved" in err  # progress and log on stderr
    bad = json.dumps({"rewards": {"toy_digits": 1.0}, "train": {"stepz": 1}})
    with pytest.raises(SystemExit) as e:
        main([*argv[:6], bad, *argv[7:]])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]  # the problem in one line, after the usage
    assert e.value.code == 2 and "argument --job: job error: unknown key 'train.stepz' (did you mean 'steps'?)" in line


def test_lora_kl_reference_is_the_base_with_adapters_off_not_a_second_copy(tiny, prompts):
    """LoRA + KL: no second model in memory; the reference log-probs are the base checkpoint's, bit for bit, after
    the adapters have moved (so the KL is not zero), and the adapters are back on afterwards."""
    from rlmeta.policy import load_policy
    from rlmeta.policy.lora import mlx_adapters_off
    from rlmeta.policy.mlx_policy import pad_batch, sequence_logprobs

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tr = MLXTrainer(tiny, prompts, experiment(steps=4, beta=0.1, lora=lora, learning_rate=5e-2), seed=0)
    assert tr.ref is None
    kls = [tr.train_step()["kl"] for _ in range(4)]
    assert kls[-1] > 0, kls
    gens = tr.policy.generate([tr.prompt_ids[0], tr.prompt_ids[1]], n=2, temperature=1.0, max_new_tokens=6, seed=3)
    batch = pad_batch([g.prompt_ids for g in gens], [g.token_ids for g in gens], tr.policy.pad_id)
    ref = np.array(tr.reference_logprobs(*batch))
    base = load_policy(tiny, "mlx").model
    np.testing.assert_array_equal(ref, np.array(sequence_logprobs(base, *batch)))
    trained = np.array(sequence_logprobs(tr.policy.model, *batch))
    assert np.abs(trained - ref).max() > 1e-4  # the adapters are on again, and they changed the model
    with mlx_adapters_off(tr.policy.model):
        np.testing.assert_array_equal(np.array(sequence_logprobs(tr.policy.model, *batch)), ref)


def test_bfloat16_policy_and_reference_train_and_the_dtype_is_refused_on_torch(tiny, prompts):
    tr = MLXTrainer(tiny, prompts, experiment(steps=2, beta=0.1, dtype="bfloat16"), seed=0)
    from mlx.utils import tree_flatten

    dtypes = {v.dtype for _, v in tree_flatten(tr.policy.model.parameters())}
    assert dtypes == {mx.bfloat16} and tr.ref is not None
    rows = [tr.train_step() for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    with pytest.raises(ValueError, match="train.dtype is bfloat16, but it sets the MLX trainer's weights"):
        RLJob.model_validate({"algorithm": "grpo", "rewards": {"toy_digits": 1.0}, "backend": "torch",
                              "train": {"dtype": "bfloat16"}})


def test_a_rewritten_base_model_is_not_resumed(tiny, prompts, tmp_path, caplog):
    """The warm start re-ran into the same folder (Snakemake re-runs the training job, but leaves the numbered
    checkpoints beside its outputs): the old run's checkpoints are removed, not resumed."""
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    exp = experiment(steps=2, checkpoint_every=1)
    assert run(model, prompts, tmp_path / "a", exp, stop_after=1) is None
    assert [s for s, _ in checkpoints.numbered(tmp_path / "a/checkpoints")] == [1]
    weights = model / "model.safetensors"
    shutil.copy(weights, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", weights)  # same bytes, rewritten the way every writer here does
    with caplog.at_level("WARNING"):
        rows = run(model, prompts, tmp_path / "a", exp)
    assert "trained with a different spec" in caplog.text and "resuming" not in caplog.text
    assert [r["step"] for r in rows] == [1, 2]
    with caplog.at_level("INFO"):  # the same inputs again: resumed (here from its end)
        caplog.clear()
        run(model, prompts, tmp_path / "a", exp)
    assert "resuming" in caplog.text
