"""GRPO / GSPO objective over MLX arrays: a copy of ``objectives`` (the NumPy reference, which
documents the maths and every deviation from TRL), differentiable w.r.t. ``logp`` with
``mx.grad`` / ``nn.value_and_grad``. The metrics are read with ``.item()``, so call it outside
``mx.compile``."""
from __future__ import annotations

import math

import mlx.core as mx

from rlmeta.rl.objectives import check_args, resolve_epsilons


def group_advantages(rewards: mx.array, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages, same shape as ``rewards``; see ``objectives.group_advantages``."""
    check_args(scale=scale)
    g = rewards.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (mx.std(g, axis=1, keepdims=True, ddof=1) + eps)
    elif scale == "batch":
        adv = adv / (mx.std(g, ddof=1) + eps)
    return adv.reshape(rewards.shape)


def token_entropy(logits: mx.array) -> mx.array:
    """Entropy (nats) of ``softmax(logits)`` along the last axis: ``logsumexp(z) - sum(softmax(z) * z)``."""
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    return (lse - (mx.exp(logits - lse) * logits).sum(axis=-1, keepdims=True)).squeeze(-1)


def _aggregate(per_token, mask, loss_type, max_completion_length, num_items):
    n, t = mask.shape
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mx.maximum(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (n * (max_completion_length or t))
    total = mask.sum() if num_items is None else mx.array(float(num_items), dtype=mask.dtype)
    return (per_token * mask).sum() / mx.maximum(total, 1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, level="token", eps_low=None, eps_high=None,
                beta=0.0, loss_type="dapo", max_completion_length=None, num_items=None, kl_correction=True,
                entropy=None):
    """(loss array, metrics of floats); see ``objectives.policy_loss``. ``entropy``: per-token entropies
    ``(B, T)`` of the policy (``token_entropy`` of the forward's logits); their token mean over ``mask`` is
    the ``entropy`` metric (absent when not given). It does not enter the loss."""
    check_args(level=level, loss_type=loss_type)
    eps_low, eps_high = resolve_epsilons(level, eps_low, eps_high)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if logp.dtype in (mx.float16, mx.bfloat16):
        logp = logp.astype(mx.float32)  # token counts and small ratios need float32
    old_logp = mx.stop_gradient(logp) if old_logp is None else old_logp
    mask = mask.astype(logp.dtype)
    adv = advantages.astype(logp.dtype)[:, None]

    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0))[:, None]
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = mx.exp(d) - d - 1
        if kl_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = mx.broadcast_to(per_token, mask.shape)
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items)

    def mean(x):
        x = mx.stop_gradient(x)
        if x.shape[1] == 1:
            return x.sum().item() / max(x.shape[0], 1)
        return (x * mask).sum().item() / max(mask.sum().item(), 1.0)

    low = ((ratio < 1 - eps_low) & (adv < 0)).astype(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(mask.dtype)
    metrics = {"ratio": mean(ratio), "clip_ratio": mean(mx.maximum(low, high)),
               "clip_ratio/low": mean(low), "clip_ratio/high": mean(high),
               "kl": math.nan if kl is None else mean(kl)}
    if entropy is not None:
        metrics["entropy"] = mean(entropy.astype(mask.dtype))
    return loss, metrics
