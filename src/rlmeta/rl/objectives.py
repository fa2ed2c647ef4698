"""GRPO / GSPO objective: the NumPy reference implementation.

Mirrors TRL's ``GRPOTrainer`` (trl 1.16: advantages in ``_generate_and_score_completions``,
loss in ``_compute_loss``); ``objectives_mlx`` is a line-by-line copy over MLX arrays, tested
against this file; TRL's own loss is tested against it too. Shapes: ``N`` sequences (prompts x group size),
``T`` completion tokens; ``mask`` is 1 on real completion tokens and 0 on padding.

Deviations from TRL, all deliberate:
- rewards must be finite (TRL's NaN "unscorable completion" handling is not reproduced);
- ``dr_grpo`` with ``max_completion_length=None`` divides by the padded width ``T``;
- ``dapo`` divides by ``num_items`` (tokens in the whole generation batch) or, by default, by the
  tokens in this batch; gradient-accumulation scaling is left to the caller for every loss type;
- the two-sided ``delta`` clip, entropy masking and vLLM importance correction are left out.
"""
from __future__ import annotations

import math

import numpy as np

from rlmeta.settings import DEFAULT_EPSILONS

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")


def default_epsilons(algorithm: str) -> tuple[float, float]:
    """(epsilon_low, epsilon_high) of an algorithm when the config leaves them null (``settings.DEFAULT_EPSILONS``)."""
    if algorithm not in DEFAULT_EPSILONS:
        raise ValueError(f"no default epsilons for algorithm {algorithm!r}; expected one of {sorted(DEFAULT_EPSILONS)}")
    return DEFAULT_EPSILONS[algorithm]


def check_args(scale=None, level=None, loss_type=None):
    """Raise ValueError on an unknown option (shared by the three implementations)."""
    for value, allowed, name in ((scale, SCALES, "scale"), (level, LEVELS, "level"),
                                 (loss_type, LOSS_TYPES, "loss_type")):
        if value is not None and value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def resolve_epsilons(level, eps_low, eps_high):
    """Fill missing epsilons from the algorithm implied by ``level`` (token -> grpo, sequence -> gspo)."""
    low, high = default_epsilons("gspo" if level == "sequence" else "grpo")
    return (low if eps_low is None else eps_low), (high if eps_high is None else eps_high)


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages, same shape as ``rewards`` ([N] or [B, G], groups contiguous).

    A = (r - mean_group(r)) / (std + eps), std being the group's (``group``), the whole batch's
    (``batch``, PPO-Lite) or none at all (``none``, Dr. GRPO). Stds are Bessel-corrected, as TRL's
    ``nanstd``; ``eps`` = 1e-4 as in TRL, so a group of equal rewards gets advantage 0.
    """
    check_args(scale=scale)
    r = np.asarray(rewards, dtype=np.float64)
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        adv = adv / (g.std(ddof=1) + eps)
    return adv.reshape(r.shape)


def _aggregate(per_token, mask, loss_type, max_completion_length, num_items):
    n, t = mask.shape
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":  # mean over all tokens of this batch
        return (per_token * mask).sum() / max(mask.sum(), 1.0)
    if loss_type == "dr_grpo":  # constant normaliser: N * max completion length
        return (per_token * mask).sum() / (n * (max_completion_length or t))
    total = mask.sum() if num_items is None else num_items  # dapo: tokens of the generation batch
    return (per_token * mask).sum() / max(total, 1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, level="token", eps_low=None, eps_high=None,
                beta=0.0, loss_type="dapo", max_completion_length=None, num_items=None, kl_correction=True):
    """Clipped surrogate loss and metrics, as TRL's ``GRPOTrainer._compute_loss``.

    logp, old_logp, ref_logp: [N, T] per-token log-probs under the current, rollout (``None`` =
    ``logp``, i.e. on-policy) and reference (``None`` allowed when beta == 0) policies.
    advantages: [N]. mask: [N, T].

    level="token" (GRPO): ratio r_t = exp(logp_t - old_logp_t).
    level="sequence" (GSPO): s_i = exp(masked mean_t(logp - old_logp)), one ratio per sequence,
    clipped once and broadcast to the sequence's tokens (TRL's ``importance_sampling_level``).
    Per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL, with k3 KL
    exp(ref - logp) - (ref - logp) - 1, multiplied by the ratio when ``kl_correction`` (TRL's
    ``use_bias_correction_kl``, default True). Aggregation by ``loss_type``: grpo, bnpo, dr_grpo,
    dapo (see ``_aggregate``). ``num_items``: active tokens of the whole generation batch when it
    is split into micro-batches whose dapo losses are summed (TRL's ``num_items_in_batch``).

    Metrics (floats): ``ratio`` mean, ``clip_ratio/low`` (r < 1 - eps_low with A < 0),
    ``clip_ratio/high`` (r > 1 + eps_high with A > 0), ``clip_ratio`` (either), ``kl`` (nan without
    ``ref_logp``); means over masked tokens, or over sequences at the sequence level, as TRL.
    """
    check_args(level=level, loss_type=loss_type)
    eps_low, eps_high = resolve_epsilons(level, eps_low, eps_high)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    logp = np.asarray(logp, dtype=np.float64)
    old_logp = logp if old_logp is None else np.asarray(old_logp, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    adv = np.asarray(advantages, dtype=np.float64)[:, None]

    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[:, None]  # [N, 1]
    ratio = np.exp(log_ratio)
    clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -np.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        d = np.asarray(ref_logp, dtype=np.float64) - logp
        kl = np.exp(d) - d - 1
        if kl_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = np.broadcast_to(per_token, mask.shape)
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items)

    def mean(x):  # TRL's global_masked_mean
        if x.shape[1] == 1:
            return float(x.sum() / max(x.shape[0], 1))
        return float((x * mask).sum() / max(mask.sum(), 1.0))

    low = ((ratio < 1 - eps_low) & (adv < 0)).astype(np.float64)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(np.float64)
    metrics = {"ratio": mean(ratio), "clip_ratio": mean(np.maximum(low, high)),
               "clip_ratio/low": mean(low), "clip_ratio/high": mean(high),
               "kl": math.nan if kl is None else mean(kl)}
    return float(loss), metrics
