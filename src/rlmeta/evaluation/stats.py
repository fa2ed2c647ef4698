"""Paired comparison of two policies on the same prompts with a bootstrap interval.

The unit is the prompt: each policy's samples on a prompt are averaged first, then the
per-prompt differences (trained - base) are resampled with replacement (seeded), and the
2.5th and 97.5th percentiles of the resampled means give the 95% interval.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

CHUNK = 256
"""Bootstrap resamples drawn per batch (bounds memory for many prompts)."""


def per_prompt_means(df: pd.DataFrame, column: str) -> pd.Series:
    """Mean of ``column`` over the samples of each prompt, indexed by prompt_id."""
    return df.groupby("prompt_id", sort=True)[column].mean()


def paired_bootstrap(diffs, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-prompt differences; ``level`` percentile interval of the mean.

    Identical differences (e.g. all 0) give an interval of exactly that value; an empty input
    gives NaNs.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if np.all(d == d[0]):
        return mean, float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        k = min(CHUNK, resamples - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return mean, float(low), float(high)


def paired_comparison(base: pd.Series, trained: pd.Series, resamples: int = 2000, seed: int = 0) -> dict:
    """Compare per-prompt means (Series indexed by prompt_id) on the prompts both have.

    Returns base_mean, trained_mean, diff_mean, diff_ci95 [low, high] and n_prompts.
    """
    both = base.index.intersection(trained.index)
    b, t = base.loc[both].to_numpy(float), trained.loc[both].to_numpy(float)
    mean, low, high = paired_bootstrap(t - b, resamples, seed)
    return {
        "base_mean": float(b.mean()) if b.size else float("nan"),
        "trained_mean": float(t.mean()) if t.size else float("nan"),
        "diff_mean": mean,
        "diff_ci95": [low, high],
        "n_prompts": int(both.size),
    }


def across_runs(values: dict, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """One number per training run (seed) -> their spread: the mean with a t-interval across runs, and the
    interquartile mean (IQM) with a percentile bootstrap interval over runs.

    The IQM and its interval are what ``rliable`` (Agarwal et al. 2021) reports: its IQM is
    ``scipy.stats.trim_mean(x, 0.25)`` and its stratified bootstrap, for a single task, resamples the runs,
    which is ``scipy.stats.bootstrap`` (percentile). scipy is used directly: rliable would bring arch,
    statsmodels and seaborn into the lock for these two lines. With fewer than 4 runs the IQM trims nothing
    and equals the mean; with one run there is no interval (null).
    """
    from scipy import stats

    runs = {str(k): float(v) for k, v in values.items()}
    x = np.asarray(list(runs.values()), dtype=np.float64)
    out = {"per_seed": runs, "n_seeds": int(x.size), "mean": float(x.mean()) if x.size else float("nan"),
           "ci95": None, "iqm": float(stats.trim_mean(x, 0.25)) if x.size else float("nan"), "iqm_ci95": None,
           "interval": f"t ({x.size - 1} df) for the mean; percentile bootstrap over seeds ({resamples}) for the IQM"}
    if x.size >= 2:
        sem = float(x.std(ddof=1) / np.sqrt(x.size))
        out["ci95"] = ([out["mean"], out["mean"]] if sem == 0 else
                       [float(v) for v in stats.t.interval(level, x.size - 1, loc=out["mean"], scale=sem)])
        if np.all(x == x[0]):
            out["iqm_ci95"] = [float(x[0]), float(x[0])]
        else:
            boot = stats.bootstrap((x,), lambda s, axis: stats.trim_mean(s, 0.25, axis=axis), n_resamples=resamples,
                                   confidence_level=level, method="percentile", vectorized=True,
                                   random_state=np.random.default_rng(seed))
            out["iqm_ci95"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return out
