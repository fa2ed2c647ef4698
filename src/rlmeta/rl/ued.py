"""UED prompt selection: Prioritized Level Replay over training prompts.

Prioritized Level Replay (Jiang, Grefenstette & Rocktaeschel, ICML 2021, arXiv:2010.03934) with
prompts as levels. A prompt's learning-potential score is the positive-value-loss proxy of its
last group of rewards, mean_i max(r_i - mean(r), 0): the group mean plays the value baseline, so
a prompt the policy always solves (or always fails) scores 0 and one with a wide spread scores
high. Never-seen prompts rank first. Each draw uses

    P = (1 - rho) * P_S + rho * P_C,   P_S(i) ∝ (1 / rank_i) ** (1 / temperature),
                                       P_C(i) ∝ steps since prompt i was last sampled,

rho = ``staleness_weight`` (tied scores share the better rank; never-sampled prompts are
infinitely stale, so P_C draws them first, uniformly). A batch of k prompts is drawn without
replacement, one draw at a time, renormalising over the prompts still available.
"""
from __future__ import annotations

import math

import numpy as np


def learning_potential(rewards) -> float:
    """Positive value loss with the group mean as the baseline: mean(max(r - mean(r), 0))."""
    r = np.asarray(rewards, dtype=np.float64).ravel()
    return float(np.maximum(r - r.mean(), 0.0).mean()) if r.size else 0.0


class UEDSampler:
    """Picks ``k`` distinct prompt indices per step; deterministic for a seed, resumable."""

    def __init__(self, n_prompts: int, staleness_weight: float = 0.3, temperature: float = 1.0, seed: int = 0):
        if n_prompts < 1 or not 0.0 <= staleness_weight <= 1.0 or temperature <= 0:
            raise ValueError("need n_prompts >= 1, 0 <= staleness_weight <= 1, temperature > 0")
        self.n, self.rho, self.temperature, self.seed = n_prompts, staleness_weight, temperature, seed
        self.step = 0  # sample() calls so far
        self.scores: list[float | None] = [None] * n_prompts  # None = never scored
        self.last_seen: list[int | None] = [None] * n_prompts  # step of the last sample(); None = never
        self.rng = np.random.default_rng(seed)

    def score_probs(self) -> np.ndarray:
        """P_S: rank-based priorities over all prompts (unscored prompts rank first)."""
        s = np.array([math.inf if v is None else v for v in self.scores])
        rank = 1 + self.n - np.searchsorted(np.sort(s), s, side="right")  # 1 + #higher: ties share
        w = (1.0 / rank) ** (1.0 / self.temperature)
        return w / w.sum()

    def staleness_probs(self, available: np.ndarray | None = None) -> np.ndarray:
        """P_C over ``available`` prompts (bool mask; default all): never-sampled ones first, uniformly."""
        avail = np.ones(self.n, bool) if available is None else available
        never = np.array([v is None for v in self.last_seen]) & avail
        if never.any():
            w = never.astype(np.float64)
        else:
            w = np.array([self.step - v if a else 0 for v, a in zip(self.last_seen, avail, strict=True)], np.float64)
        return w / w.sum()

    def probs(self, available: np.ndarray | None = None, score_probs: np.ndarray | None = None) -> np.ndarray:
        """The mixture P for one draw among ``available`` prompts (default all)."""
        avail = np.ones(self.n, bool) if available is None else available
        ps = (self.score_probs() if score_probs is None else score_probs) * avail
        return (1 - self.rho) * ps / ps.sum() + self.rho * self.staleness_probs(avail)

    def sample(self, k: int) -> list[int]:
        """Draw ``k`` distinct prompts (k <= n_prompts) and mark them seen at this step."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be in [1, {self.n}], got {k}")
        avail, ps, picked = np.ones(self.n, bool), self.score_probs(), []
        for _ in range(k):
            cdf = np.cumsum(self.probs(avail, ps))
            i = int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), self.n - 1))
            while not avail[i]:  # guard against round-off landing on a zero-probability slot
                i = (i - 1) % self.n
            avail[i] = False
            picked.append(i)
        for i in picked:
            self.last_seen[i] = self.step
        self.step += 1
        return picked

    def update(self, indices, group_rewards) -> None:
        """Store the learning potential of each prompt's latest group of rewards."""
        for i, r in zip(indices, group_rewards, strict=True):
            self.scores[int(i)] = learning_potential(r)

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state (the RNG included)."""
        return {"n_prompts": self.n, "staleness_weight": self.rho, "temperature": self.temperature,
                "seed": self.seed, "step": self.step, "scores": list(self.scores),
                "last_seen": list(self.last_seen), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["n_prompts"] != self.n:
            raise ValueError(f"state is for {state['n_prompts']} prompts, sampler has {self.n}")
        self.rho, self.temperature, self.seed = state["staleness_weight"], state["temperature"], state["seed"]
        self.step, self.scores, self.last_seen = state["step"], list(state["scores"]), list(state["last_seen"])
        self.rng.bit_generator.state = state["rng"]
