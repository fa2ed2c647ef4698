"""UED prompt selection (Prioritized Level Replay over prompts)."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from rlmeta.rl.ued import UEDSampler, learning_potential


def test_learning_potential():
    assert learning_potential([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert learning_potential([0.0, 0.0, 0.0, 0.0]) == 0.0
    assert learning_potential([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.25)
    assert learning_potential([0.0, 10.0]) > learning_potential([0.0, 1.0])


def test_high_spread_prompts_are_picked_far_more_often():
    s = UEDSampler(20, staleness_weight=0.1, temperature=0.5, seed=0)
    s.update(range(10), [[1.0] * 4] * 10)  # solved every time: nothing to learn
    s.update(range(10, 20), [[0.0, 1.0, 0.0, 1.0]] * 10)  # wide spread
    counts = Counter()
    for _ in range(200):
        counts.update(s.sample(4))
    high = sum(counts[i] for i in range(10, 20))
    low = sum(counts[i] for i in range(10))
    assert high > 3 * low
    assert low > 0  # the staleness term keeps zero-spread prompts alive


def test_unseen_prompts_have_top_priority():
    s = UEDSampler(6, staleness_weight=0.0, temperature=1.0, seed=0)
    s.update([0, 1, 2, 3, 4], [[0.0, 5.0]] * 5)
    p = s.score_probs()
    assert p[5] == p.max() and p[5] > p[0]
    np.testing.assert_allclose(p[:5], p[0])  # ties share a rank


def test_rank_priorities_follow_temperature():
    s = UEDSampler(3, staleness_weight=0.0, temperature=0.5, seed=0)
    s.update([0, 1, 2], [[0.0, 3.0], [0.0, 2.0], [0.0, 1.0]])
    w = np.array([1.0, 1 / 2, 1 / 3]) ** 2
    np.testing.assert_allclose(s.score_probs(), w / w.sum())
    np.testing.assert_allclose(s.probs(), w / w.sum())


@pytest.mark.parametrize("n,k", [(10, 3), (17, 4), (8, 8)])
def test_pure_staleness_never_starves(n, k):
    s = UEDSampler(n, staleness_weight=1.0, seed=1)
    s.update(range(n), [[0.0, float(i)] for i in range(n)])  # scores are ignored at rho = 1
    seen = set()
    for _ in range(math.ceil(n / k)):
        batch = s.sample(k)
        assert len(set(batch)) == k
        seen.update(batch)
    assert seen == set(range(n))
    last = dict(enumerate(s.last_seen))  # long run: nobody waits much longer than n / k steps
    worst = 0
    for t in range(s.step, s.step + 300):
        for i in s.sample(k):
            worst = max(worst, t - last[i])
            last[i] = t
    worst = max(worst, max(s.step - 1 - v for v in last.values()))
    assert worst <= 4 * math.ceil(n / k)


def test_deterministic_for_a_seed():
    def run(seed):
        s = UEDSampler(30, staleness_weight=0.3, temperature=1.0, seed=seed)
        out = []
        for step in range(20):
            idx = s.sample(5)
            s.update(idx, [[0.0, (i * 7 + step) % 5] for i in idx])
            out.append(idx)
        return out
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_state_round_trip_through_json():
    a = UEDSampler(12, staleness_weight=0.5, temperature=0.7, seed=9)
    for _ in range(5):
        idx = a.sample(3)
        a.update(idx, [[0.0, float(i % 4)] for i in idx])
    state = json.loads(json.dumps(a.state_dict()))
    b = UEDSampler(12, staleness_weight=0.5, temperature=0.7, seed=0)
    b.load_state_dict(state)
    for _ in range(10):
        ia, ib = a.sample(3), b.sample(3)
        assert ia == ib
        a.update(ia, [[0.0, 1.0]] * 3)
        b.update(ib, [[0.0, 1.0]] * 3)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError):
        UEDSampler(5).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        UEDSampler(4, staleness_weight=1.5)
    with pytest.raises(ValueError):
        UEDSampler(4).sample(5)
    with pytest.raises(ValueError):
        UEDSampler(4).update([0, 1], [[1.0]])


# ---------------------------------------------------------------- UED on TRL: UEDRepeatSampler

def repeat_sampler(n=10, k=3, group_size=2, repeat=2, seed=5):
    from rlmeta.rl.trl_trainer import UEDRepeatSampler

    return UEDRepeatSampler(UEDSampler(n, staleness_weight=0.3, temperature=1.0, seed=seed), k, group_size, repeat, n)


def take_batches(it, sampler, batches: int) -> list[list[int]]:
    """The prompt indices of the next ``batches`` draws, checking TRL's RepeatSampler layout on the way."""
    from itertools import islice

    out = []
    per_batch = sampler.k * sampler.group_size * sampler.repeat
    for _ in range(batches):
        flat = list(islice(it, per_batch))
        idx = flat[::sampler.group_size][:sampler.k]
        # each prompt group_size times in a row, the whole batch repeat times (one per update)
        assert flat == [i for _ in range(sampler.repeat) for i in idx for _ in range(sampler.group_size)]
        out.append(idx)
    return out


def completions_of(batch, group_size, rewards_of):
    """TRL's per-completion (prompt index, total reward) lists for a batch, in a shuffled order."""
    pairs = [(i, rewards_of(i, j)) for i in batch for j in range(group_size)]
    pairs = pairs[1::2] + pairs[::2]  # feedback must group by prompt, not rely on the order
    return [i for i, _ in pairs], [r for _, r in pairs]


def test_repeat_sampler_draws_distinct_prompts_in_trl_layout():
    s = repeat_sampler(n=10, k=3, group_size=2, repeat=2)
    assert len(s) == 4 * 3 * 2 * 2  # ceil(10 / 3) batches of one pass, for the Trainer's epoch bookkeeping
    it = iter(s)
    batches = take_batches(it, s, 4)
    assert all(len(set(b)) == 3 and all(0 <= i < 10 for i in b) for b in batches)
    assert len(set().union(*batches)) == 10  # unseen prompts are drawn first: four batches cover all ten
    assert list(s.pending) == batches and s.ued.step == 4  # drawn, not scored yet


def test_feedback_pops_the_oldest_pending_batch_and_scores_its_prompts():
    s = repeat_sampler(n=8, k=3, group_size=4, repeat=1)
    it = iter(s)
    b1, b2 = take_batches(it, s, 2)
    reward = lambda i, j: float((i + j) % 2) if i % 2 else 1.0  # odd prompts: spread; even: solved
    s.feedback(*completions_of(b1, 4, reward))
    assert list(s.pending) == [b2]
    for i in range(8):
        if i in b1:
            assert s.ued.scores[i] == learning_potential([reward(i, j) for j in range(4)])
        else:
            assert s.ued.scores[i] is None
    s.feedback(*completions_of(b2, 4, lambda i, j: 0.5 * j))
    assert not s.pending
    assert all(s.ued.scores[i] == learning_potential([0.0, 0.5, 1.0, 1.5]) for i in b2)  # the latest group
    with pytest.raises(IndexError):  # rewards for a batch that was never drawn
        s.feedback([0], [1.0])


def test_repeat_sampler_state_round_trip_replays_pending_batches_first():
    reward = lambda i, j: float((i * 3 + j) % 4)
    a = repeat_sampler(n=12, k=4, group_size=2, repeat=2, seed=1)
    it_a = iter(a)
    b1, b2 = take_batches(it_a, a, 2)  # the data loader draws a batch ahead of training
    a.feedback(*completions_of(b1, 2, reward))
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint holds: b2 drawn, not scored
    assert state["pending"] == [b2] and state["ued"]["step"] == 2

    b = repeat_sampler(n=12, k=4, group_size=2, repeat=2, seed=99)  # the seed comes from the state
    b.load_state_dict(state)
    it_b = iter(b)
    assert take_batches(it_b, b, 1) == [b2] and b.ued.step == 2  # replayed, not drawn again
    for sampler in (a, b):
        sampler.feedback(*completions_of(b2, 2, reward))
    rest_a, rest_b = [], []
    for _ in range(3):
        for sampler, it, rest in ((a, it_a, rest_a), (b, it_b, rest_b)):
            (idx,) = take_batches(it, sampler, 1)
            sampler.feedback(*completions_of(idx, 2, reward))
            rest.append(idx)
    assert rest_a == rest_b and a.state_dict() == b.state_dict()
    with pytest.raises(ValueError):
        repeat_sampler(n=5).load_state_dict(state)
