"""DAPO's controls (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"), shared by
both RL trainers; NumPy only (no torch, TRL or MLX import here).

- ``overlong_penalty``: the soft overlong punishment (eq. 13) on completion lengths (``train.overlong_buffer``);
  the MLX trainer adds it to the total reward, the TRL trainer passes ``overlong_reward_function`` to
  ``GRPOTrainer`` as one more reward function with weight ``train.overlong_penalty``.
- ``has_spread`` / ``DynamicBatch``: dynamic sampling (``train.dynamic_sampling``, both trainers): groups whose rewards
  are all equal carry no gradient and are replaced by groups of further rollout batches.
- ``metric_columns``: the train_metrics extra columns of a job (``reward/<name>``, and those of DAPO's controls).

Masking truncated completions (``train.mask_truncated``) is TRL's ``mask_truncated_completions`` on torch and a
loss mask in ``MLXTrainer.rollout`` on MLX.
"""
from __future__ import annotations

import numpy as np

OVERLONG = "reward/overlong"
"""train_metrics column: the mean overlong penalty of the rollout batch (unweighted, in [-1, 0])."""
EXTRA_BATCHES = "dynamic_extra_batches"
"""train_metrics column: extra rollout batches dynamic sampling drew in the step (0 .. train.dynamic_sampling)."""
GROUPS_KEPT = "dynamic_groups_kept"
"""train_metrics column: groups with a reward spread the step trained on (0 .. batch_prompts)."""


def overlong_penalty(lengths, max_len: int, buffer: int) -> np.ndarray:
    """DAPO eq. 13 for completion lengths |y| (tokens, the stop token included, as TRL's ``completion_ids``):
    0 when |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1 beyond
    (L_max = ``max_len``, L_cache = ``buffer``). The same values as ``trl.rewards.get_soft_overlong_punishment``."""
    if not 0 < buffer < max_len:
        raise ValueError(f"overlong buffer {buffer} must be in 1 .. max_len - 1 = {max_len - 1}")
    y = np.asarray(lengths, dtype=np.float64)
    start = max_len - buffer
    return np.where(y <= start, 0.0, np.where(y <= max_len, (start - y) / buffer, -1.0))


def overlong_reward_function(max_len: int, buffer: int):
    """A TRL reward function named ``overlong`` (TRL logs ``rewards/overlong/mean``): ``overlong_penalty`` of the
    lengths of the ``completion_ids`` TRL passes to every reward function."""
    def overlong(completion_ids, **trl_kwargs):
        return overlong_penalty([len(ids) for ids in completion_ids], max_len, buffer).tolist()

    return overlong


def has_spread(totals, group_size: int) -> np.ndarray:
    """One bool per group (groups contiguous): its rewards are not all equal (the ``zero_std_frac`` test)."""
    spread = np.asarray(totals, dtype=np.float64).reshape(-1, group_size).std(axis=1)
    return ~np.isclose(spread, 0.0, rtol=1e-5, atol=1e-8)


def metric_columns(job) -> list[str]:
    """The extra train_metrics columns of an RL job: ``reward/<name>`` per reward, then ``reward/overlong`` with the
    overlong penalty and the dynamic-sampling counts with dynamic sampling."""
    t = job.train
    return ([f"reward/{n}" for n in job.rewards] + ([OVERLONG] if t.overlong_buffer is not None else [])
            + ([EXTRA_BATCHES, GROUPS_KEPT] if t.dynamic_sampling else []))


class DynamicBatch:
    """Groups collected over the rollout batches of one step with dynamic sampling.

    ``add(n_groups, spread)`` takes a drawn batch's per-group ``has_spread``; groups with a spread are kept, in
    draw order, up to ``want``. ``full`` says whether ``want`` were found. ``selection()`` gives
    ``(batch number, group index)`` of the groups the step trains on: the kept ones, or, when not one group of
    any batch had a spread, every group of the first batch (all advantages 0, as without dynamic sampling: the
    step still runs and is logged).
    """

    def __init__(self, want: int):
        self.want, self.batches = want, 0
        self.kept: list[tuple[int, int]] = []
        self.first_groups = 0

    def add(self, spread) -> None:
        spread = list(map(bool, spread))
        if self.batches == 0:
            self.first_groups = len(spread)
        for j, s in enumerate(spread):
            if s and len(self.kept) < self.want:
                self.kept.append((self.batches, j))
        self.batches += 1

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.want

    def selection(self) -> list[tuple[int, int]]:
        return list(self.kept) if self.kept else [(0, j) for j in range(self.first_groups)]
