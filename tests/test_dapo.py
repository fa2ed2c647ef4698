"""DAPO's controls (Yu et al. 2025) on both trainers: the soft overlong penalty (eq. 13) against hand-computed values
on each backend's reward path, dynamic sampling's extra draws on MLX and TRL (replayed by hand),
masking truncated completions out of the loss
(MLX: no gradient from a masked row; TRL: its own ``mask_truncated_completions``), and one-line config errors."""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlmeta.policy.base import derive_seed
from rlmeta.rl import dapo
from rlmeta.rl.evidence import read_rollouts
from rlmeta.rl.objectives import group_advantages
from rlmeta.settings import ConfigError, RLJob, WandbSettings, parse
from rlmeta.testing.models import build_trainer_model, write_count_prompts
from rlmeta.testing.rewards import registered

OFF = WandbSettings(mode="disabled")
N_TRAIN = 6

# L_max = 10, L_cache = 4: no penalty up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
HAND = {0: 0.0, 1: 0.0, 5: 0.0, 6: 0.0, 7: -0.25, 8: -0.5, 9: -0.75, 10: -1.0, 11: -1.0, 40: -1.0}


def text_hash(completion, reference=None, prompt=None):
    """0 for prompts with an even number, else a hash of the completion (differs within a group)."""
    number = int(prompt[-1]["content"].split()[1])
    return 0.0 if number % 2 == 0 else zlib.crc32(completion.encode()) % 97 / 97


def constant(completion, reference=None, prompt=None):
    return 0.5


SCORED: list[int] = []  # the prompt number of every completion toy_logged_hash scored, in order


def logged_hash(completion, reference=None, prompt=None):
    SCORED.append(int(prompt[-1]["content"].split()[1]))
    return text_hash(completion, reference, prompt)


@pytest.fixture(scope="module", autouse=True)
def toy_rewards():
    with registered("toy_hash", text_hash, "hash of odd prompts' completions"), \
            registered("toy_const", constant, "always 0.5"), \
            registered("toy_logged_hash", logged_hash, "toy_hash, recording the prompts it scores"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_trainer_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_count_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", N_TRAIN, 2)


def job(backend: str = "mlx", reward: str = "toy_hash", **train) -> RLJob:
    t = {"steps": 2, "batch_prompts": 2, "group_size": 4, "learning_rate": 1e-2, "max_new_tokens": 10,
         "checkpoint_every": 10, "eval_every": None, **train}
    return RLJob.model_validate({"algorithm": "grpo", "rewards": {reward: 1.0}, "train": t, "backend": backend})


def mlx_trainer(tiny, prompts, j: RLJob, seed: int = 3):
    pytest.importorskip("mlx.core")
    from rlmeta.rl.mlx_trainer import MLXTrainer

    return MLXTrainer(tiny, prompts, j, seed)


# -- the soft overlong penalty --------------------------------------------------------------------------------------

def test_overlong_penalty_against_hand_values_and_trl():
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(HAND)
    assert dapo.overlong_penalty(lengths, 10, 4).tolist() == list(HAND.values())
    ids = [[7] * n for n in lengths]
    assert get_soft_overlong_punishment(10, 4)(ids) == pytest.approx(list(HAND.values()))
    assert dapo.overlong_reward_function(10, 4)(completion_ids=ids, prompts=None) == list(HAND.values())
    with pytest.raises(ValueError):
        dapo.overlong_penalty([1], 10, 10)


def test_trl_gets_the_penalty_as_a_weighted_reward_function():
    from rlmeta.rl.trl_trainer import grpo_config_kwargs, reward_functions

    j = job("torch", overlong_buffer=4, overlong_penalty=0.5, mask_truncated=True)
    kw = grpo_config_kwargs(j, "/tmp/x", cuda=False)
    assert kw["reward_weights"] == [1.0, 0.5]
    assert kw["mask_truncated_completions"] is True
    funcs = reward_functions(j)
    assert [f.__name__ for f in funcs] == ["toy_hash", "overlong"]
    lengths = list(HAND)
    assert funcs[-1](prompts=[None] * len(lengths), completions=[""] * len(lengths),
                     completion_ids=[[1] * n for n in lengths]) == list(HAND.values())
    off = grpo_config_kwargs(job("torch"), "/tmp/x", cuda=False)
    assert off["reward_weights"] == [1.0] and off["mask_truncated_completions"] is False
    assert [f.__name__ for f in reward_functions(job("torch"))] == ["toy_hash"]
    assert j.reward_floor == pytest.approx(0.0 - 0.5)  # the mix's floor, minus the penalty's weight


def _check_penalised_rollouts(table, metrics, weight: float):
    rows = table.to_pylist()
    pen = {r["n_tokens"]: HAND[r["n_tokens"]] for r in rows}
    for r in rows:  # the total the advantages used: the reward plus weight x the hand-computed penalty
        assert r["reward"] == pytest.approx(r["reward/toy_hash"] + weight * HAND[r["n_tokens"]], abs=1e-6)
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(HAND[r["n_tokens"]])
    assert [m["reward/overlong"] for m in metrics][:1] == pytest.approx([np.mean(by_step[0])], abs=1e-6)
    return pen


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_overlong_penalty_on_each_trainers_reward_path(backend, tiny, prompts, tmp_path):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        from rlmeta.rl.mlx_trainer import train_mlx as train
    else:
        from rlmeta.rl.trl_trainer import train_trl as train
    j = job(backend, steps=1, overlong_buffer=4, overlong_penalty=0.5, max_new_tokens=10, mask_truncated=True)
    train(tiny, prompts, j, tmp_path / "ck", tmp_path / "m.parquet", OFF, seed=3, rollouts_path=tmp_path / "ro")
    table, metrics = read_rollouts(tmp_path / "ro"), pq.read_table(tmp_path / "m.parquet").to_pylist()
    pen = _check_penalised_rollouts(table, metrics, 0.5)
    assert any(v < 0 for v in pen.values()), f"no completion in the penalty zone (lengths {sorted(pen)})"
    for r in table.to_pylist():  # masked out of the loss, but logged with their real length and text (TRL too)
        assert r["n_tokens"] > 0 and (not r["truncated"] or r["n_tokens"] == 10)
    assert any(r["truncated"] for r in table.to_pylist())
    rewards = np.array(table.column("reward").to_pylist())
    adv = group_advantages(rewards, 4)  # the advantages were computed from the penalised totals
    assert np.array(table.column("advantage").to_pylist()) == pytest.approx(adv, abs=1e-4)


# -- dynamic sampling (MLX) --------------------------------------------------------------------------------------

def test_equal_rewards_trigger_every_extra_draw(tiny, prompts):
    tr = mlx_trainer(tiny, prompts, job(reward="toy_const", dynamic_sampling=2, steps=1))
    row = tr.train_step()
    assert row["dynamic_extra_batches"] == 2 and row["dynamic_groups_kept"] == 0
    assert tr.sampler.pos == 6  # three batches of 2 prompts were drawn from the epoch's order
    assert row["zero_std_frac"] == 1.0 and row["grad_norm"] == 0.0  # trained on the first batch: no signal
    assert row["reward_mean"] == pytest.approx(0.5)


def test_dynamic_sampling_keeps_groups_with_a_spread(tiny, prompts):
    from rlmeta.rl.mlx_state import EpochSampler

    j = job(dynamic_sampling=3, steps=3)
    tr = mlx_trainer(tiny, prompts, j)
    order = EpochSampler(N_TRAIN, derive_seed(3, "order"))  # the trainer's prompt order, replayed
    for _ in range(3):
        ro = tr.rollout()
        # by hand: batches of 2 until 2 odd prompts (the only ones with a reward spread) are found or 3 extra drawn
        drawn, odd = 0, []
        while len(odd) < 2 and drawn <= 3:
            odd += [i for i in order.sample(2) if i % 2 == 1][:2 - len(odd)]
            drawn += 1
        assert ro["stats"]["dynamic_extra_batches"] == drawn - 1
        assert ro["stats"]["dynamic_groups_kept"] == len(odd)
        assert ro["indices"] == odd
        assert ro["stats"]["zero_std_frac"] == 0.0
        tr.step += 1


# -- dynamic sampling (TRL) --------------------------------------------------------------------------------------

def _train_trl(tiny, prompts, tmp_path, j: RLJob):
    from rlmeta.rl.trl_trainer import train_trl

    train_trl(tiny, prompts, j, tmp_path / "ck", tmp_path / "m.parquet", OFF, seed=3, rollouts_path=tmp_path / "ro")
    return pq.read_table(tmp_path / "m.parquet").to_pylist(), read_rollouts(tmp_path / "ro").to_pylist()


def test_trl_equal_rewards_trigger_every_extra_draw_as_on_mlx(tiny, prompts, tmp_path):
    metrics, rows = _train_trl(tiny, prompts, tmp_path, job("torch", reward="toy_const", dynamic_sampling=2, steps=2))
    for m in metrics:  # the MLX trainer's row of the same case (test_equal_rewards_trigger_every_extra_draw)
        assert m["dynamic_extra_batches"] == 2 and m["dynamic_groups_kept"] == 0
        assert m["zero_std_frac"] == 1.0 and m["grad_norm"] == 0.0 and m["reward_mean"] == pytest.approx(0.5)
    assert len(rows) == 2 * 2 * 4  # each step trained on (and logged) its first batch: 2 groups of 4
    assert {r["advantage"] for r in rows} == {0.0}


def test_trl_dynamic_sampling_keeps_groups_with_a_spread(tiny, prompts, tmp_path):
    SCORED.clear()
    steps, budget, g = 4, 3, 4
    metrics, rows = _train_trl(tiny, prompts, tmp_path,
                               job("torch", reward="toy_logged_hash", dynamic_sampling=budget, steps=steps))
    draws = [SCORED[i:i + 2 * g:g] for i in range(0, len(SCORED), 2 * g)]  # each draw's 2 prompts, in order
    assert all(SCORED[i:i + 2 * g] == [n for n in d for _ in range(g)] for i, d in zip(range(0, len(SCORED), 2 * g),
                                                                                    draws))
    assert len(draws) == steps + sum(m["dynamic_extra_batches"] for m in metrics)
    for step, m in enumerate(metrics):
        own, draws = draws[:1 + int(m["dynamic_extra_batches"])], draws[1 + int(m["dynamic_extra_batches"]):]
        # by hand: draw until 2 groups of odd prompts (the only ones with a reward spread) or the budget is spent
        odd = [n for d in own for n in d if n % 2 == 1][:2]
        reached = [k for k in range(1, len(own) + 1) if sum(n % 2 for d in own[:k] for n in d) >= 2]
        assert len(own) - 1 == (reached[0] - 1 if reached else budget)
        assert m["dynamic_groups_kept"] == len(odd)
        trained = [r for r in rows if r["step"] == step]
        expect = odd if odd else own[0]  # none with a spread: the first batch as drawn
        assert [int(r["prompt_id"][1:]) for r in trained] == [n for n in expect for _ in range(g)]
        assert m["zero_std_frac"] == (0.0 if odd else 1.0)
        rewards = [r["reward"] for r in trained]  # the advantages of the kept groups are their own groups'
        assert [r["advantage"] for r in trained] == pytest.approx(group_advantages(rewards, g), abs=1e-3)
        assert m["reward_mean"] == pytest.approx(np.mean(rewards), abs=1e-6)
    assert any(m["dynamic_extra_batches"] > 0 for m in metrics)


def test_merge_groups_pads_as_trl_and_keeps_the_chosen_rows():
    import torch

    from rlmeta.rl.trl_trainer import merge_groups

    a = {"prompt_ids": torch.tensor([[5, 6], [7, 8]]), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
         "completion_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]),
         "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]), "advantages": torch.tensor([0.5, -0.5]),
         "old_per_token_logps": None}
    b = {"prompt_ids": torch.tensor([[9, 9, 9]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
         "completion_ids": torch.tensor([[3]]), "completion_mask": torch.tensor([[1]]),
         "advantages": torch.tensor([1.0]), "old_per_token_logps": None}
    m = merge_groups([a, b], [(1, 0), (0, 1)], pad_id=0)
    assert m["prompt_ids"].tolist() == [[9, 9, 9], [0, 7, 8]]  # prompts padded on the left
    assert m["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert m["completion_ids"].tolist() == [[3, 0, 0], [4, 0, 0]]  # completions on the right
    assert m["completion_mask"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert m["advantages"].tolist() == [1.0, -0.5] and "old_per_token_logps" not in m


def test_dynamic_sampling_off_adds_no_columns_and_draws_once(tiny, prompts):
    tr = mlx_trainer(tiny, prompts, job(reward="toy_const", steps=1))
    ro = tr.rollout()
    assert tr.sampler.pos == 2 and "dynamic_extra_batches" not in ro["stats"]
    assert dapo.metric_columns(job()) == ["reward/toy_hash"]
    assert dapo.metric_columns(job(dynamic_sampling=1, overlong_buffer=2)) == [
        "reward/toy_hash", "reward/overlong", "dynamic_extra_batches", "dynamic_groups_kept"]


def test_dynamic_batch_selection():
    b = dapo.DynamicBatch(3)
    b.add([False, True])
    assert not b.full
    b.add([True, True])
    assert b.full and b.selection() == [(0, 1), (1, 0), (1, 1)]
    empty = dapo.DynamicBatch(2)
    empty.add([False, False])
    empty.add([False, False])
    assert empty.selection() == [(0, 0), (0, 1)]  # none with a spread: the first batch as drawn


# -- masking truncated completions -----------------------------------------------------------------------------

def test_truncated_completions_are_masked_but_keep_their_advantages(tiny, prompts):
    tr = mlx_trainer(tiny, prompts, job(mask_truncated=True, max_new_tokens=3))
    ro = tr.rollout()
    b, gens = ro["batch"], ro["generations"]
    truncated = np.array([g.finish_reason == "length" for g in gens])
    assert truncated.any()
    rows_kept = np.array(b["loss_mask"]).sum(axis=1) > 0
    assert (rows_kept == ~truncated).all()
    assert np.array(b["mask"]).sum(axis=1).tolist() == [len(g.token_ids) for g in gens]  # the forward's mask
    rewards = [text_hash(g.text, None, tr.prompts[ro["indices"][g.prompt_index]]["prompt"]) for g in gens]
    assert np.array(b["adv"]) == pytest.approx(group_advantages(rewards, 4), abs=1e-5)  # from every reward


def test_a_masked_row_contributes_no_gradient(tiny, prompts):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tr = mlx_trainer(tiny, prompts, job(max_new_tokens=4))
    b = tr.rollout()["batch"]
    n = b["mask"].shape[0]
    masked = [1, 6]
    keep = np.array([i not in masked for i in range(n)])
    with_mask = dict(b, loss_mask=b["mask"] * mx.array(keep.astype(np.float32))[:, None])
    rows = mx.array(np.flatnonzero(keep))
    removed = {k: (v[rows] if isinstance(v, mx.array) else v) for k, v in b.items()}
    removed["loss_mask"] = removed["mask"]
    g1, loss1, _ = tr.gradients(with_mask, old_logp=False)
    g2, loss2, _ = tr.gradients(removed, old_logp=False)
    g0, _, _ = tr.gradients(b, old_logp=False)
    flat1, flat2, flat0 = (dict(tree_flatten(g)) for g in (g1, g2, g0))
    assert loss1 == pytest.approx(loss2, abs=1e-6)
    total = sum(float(mx.abs(v).sum().item()) for v in flat2.values())
    assert total > 0
    for k in flat1:
        np.testing.assert_allclose(np.array(flat1[k]), np.array(flat2[k]), rtol=1e-4, atol=1e-7)
    assert any(not np.allclose(np.array(flat0[k]), np.array(flat1[k]), atol=1e-7) for k in flat0)


# -- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train, backend, words", [
    ({"overlong_buffer": 128}, "mlx", ["overlong_buffer 128", "max_new_tokens 128"]),
    ({"overlong_buffer": 0}, "mlx", ["overlong_buffer", "0", "greater than or equal to 1"]),
    ({"overlong_penalty": 2.0}, "mlx", ["overlong_penalty", "overlong_buffer"]),
    ({"dynamic_sampling": -1}, "mlx", ["dynamic_sampling", "-1"]),
    ({"dynamic_sampling": 2, "batch_prompts": 3, "group_size": 2, "distributed": {"nproc": 2}}, "torch",
     ["dynamic_sampling needs whole groups", "batch_prompts 3", "nproc 2"]),
])
def test_config_errors_are_one_line(train, backend, words):
    with pytest.raises(ConfigError) as e:
        parse(RLJob, {"rewards": {"toy_hash": 1.0}, "backend": backend, "train": train})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
