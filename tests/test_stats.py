"""Paired bootstrap: coverage of known differences, zero and identical inputs, determinism."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rlmeta.evaluation.stats import paired_bootstrap, paired_comparison, per_prompt_means


@pytest.mark.parametrize("shift", [0.5, -0.3, 2.0])
def test_known_difference_is_inside_the_interval(shift):
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 200)
    trained = base + shift + rng.normal(0, 0.2, 200)
    mean, low, high = paired_bootstrap(trained - base, resamples=2000, seed=3)
    assert low < shift < high
    assert low < mean < high
    assert high - low < 0.2  # paired: the shared base noise cancels


def test_zero_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    d = rng.normal(0, 1, 300)
    d -= d.mean()
    mean, low, high = paired_bootstrap(d, resamples=2000, seed=0)
    assert abs(mean) < 1e-12 and low < 0 < high


def test_identical_inputs_give_exact_zero():
    base = pd.Series([0.1, 0.5, 0.9], index=["a", "b", "c"])
    out = paired_comparison(base, base.copy(), resamples=500, seed=0)
    assert out["diff_mean"] == 0.0 and out["diff_ci95"] == [0.0, 0.0]
    assert out["base_mean"] == out["trained_mean"] and out["n_prompts"] == 3


def test_deterministic_for_a_seed():
    d = np.random.default_rng(0).normal(0.1, 1, 50)
    assert paired_bootstrap(d, 1000, seed=7) == paired_bootstrap(d, 1000, seed=7)
    assert paired_bootstrap(d, 1000, seed=7) != paired_bootstrap(d, 1000, seed=8)


def test_comparison_pairs_on_prompt_ids_and_averages_samples():
    base = pd.DataFrame({"prompt_id": ["a", "a", "b", "b", "c"], "reward": [0.0, 1.0, 1.0, 1.0, 0.0]})
    trained = pd.DataFrame({"prompt_id": ["b", "b", "a", "a"], "reward": [1.0, 0.0, 1.0, 1.0]})
    b, t = per_prompt_means(base, "reward"), per_prompt_means(trained, "reward")
    out = paired_comparison(b, t, resamples=200, seed=0)
    assert out["n_prompts"] == 2  # "c" has no trained samples
    assert out["base_mean"] == pytest.approx(0.75) and out["trained_mean"] == pytest.approx(0.75)
    assert out["diff_mean"] == pytest.approx(0.0)  # a: +0.5, b: -0.5
    assert out["diff_ci95"][0] <= 0 <= out["diff_ci95"][1]


def test_empty_input_gives_nan():
    mean, low, high = paired_bootstrap([], 100, 0)
    assert np.isnan(mean) and np.isnan(low) and np.isnan(high)
