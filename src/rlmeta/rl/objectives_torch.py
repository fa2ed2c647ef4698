"""GRPO / GSPO objective over torch tensors: a copy of ``objectives`` (the NumPy reference, which
documents the maths and every deviation from TRL), differentiable w.r.t. ``logp``."""
from __future__ import annotations

import math

import torch

from rlmeta.rl.objectives import check_args, default_epsilons, lr_at, resolve_epsilons  # noqa: F401


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages, same shape as ``rewards``; see ``objectives.group_advantages``."""
    check_args(scale=scale)
    g = rewards.reshape(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (g.std(dim=1, keepdim=True) + eps)  # torch's std is Bessel-corrected
    elif scale == "batch":
        adv = adv / (g.std() + eps)
    return adv.reshape(rewards.shape)


def _aggregate(per_token, mask, loss_type, max_completion_length, num_items):
    n, t = mask.shape
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (n * (max_completion_length or t))
    total = mask.sum() if num_items is None else mask.new_tensor(float(num_items))
    return (per_token * mask).sum() / total.clamp(min=1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, level="token", eps_low=None, eps_high=None,
                beta=0.0, loss_type="dapo", max_completion_length=None, num_items=None, kl_correction=True):
    """(loss tensor, metrics of floats); see ``objectives.policy_loss``."""
    check_args(level=level, loss_type=loss_type)
    eps_low, eps_high = resolve_epsilons(level, eps_low, eps_high)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if logp.dtype in (torch.float16, torch.bfloat16):
        logp = logp.float()  # token counts and small ratios need float32
    old_logp = logp.detach() if old_logp is None else old_logp
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)

    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if kl_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
    per_token = per_token.expand(mask.shape)
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items)

    @torch.no_grad()
    def mean(x):
        if x.shape[1] == 1:
            return x.sum().item() / max(x.shape[0], 1)
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    metrics = {"ratio": mean(ratio), "clip_ratio": mean(torch.maximum(low, high)),
               "clip_ratio/low": mean(low), "clip_ratio/high": mean(high),
               "kl": math.nan if kl is None else mean(kl)}
    return loss, metrics
