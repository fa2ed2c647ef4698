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
