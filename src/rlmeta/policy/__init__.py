"""Language-model policies on two backends (mlx-lm, transformers) over one checkpoint format."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlmeta.policy.base import Generation, Policy
from rlmeta.settings import LoraSettings

BACKENDS = ("mlx", "torch")


def load_policy(path_or_id: str | Path, backend: str, *, lora: LoraSettings | str | Path | None = None,
                dtype: str = "float32", device: str | None = None,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> Policy:
    """Open a checkpoint on ``backend`` (``mlx`` or ``torch``).

    ``lora``: None, a ``LoraSettings`` block (fresh trainable adapters), or an adapter folder
    written by ``rlmeta.policy.lora.save_adapter`` on the same backend. ``device`` (torch only):
    default CUDA when available, else CPU. ``chat_template_kwargs``: keyword arguments of the chat template
    whenever the policy encodes messages (``train.chat_template_kwargs``; e.g. ``{"enable_thinking": False}``).
    """
    from rlmeta.models.hub import hub_errors

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    with hub_errors(str(path_or_id)):  # offline hub id -> one clear line
        if backend == "mlx":
            from rlmeta.policy.mlx_policy import MLXPolicy

            policy = MLXPolicy.load(path_or_id, dtype=dtype)
        else:
            from rlmeta.policy.torch_policy import TorchPolicy

            policy = TorchPolicy.load(path_or_id, dtype=dtype, device=device)
    policy.chat_template_kwargs = dict(chat_template_kwargs or {})
    if isinstance(lora, LoraSettings):
        from rlmeta.policy.lora import apply_lora

        apply_lora(policy, lora)
    elif lora is not None:
        from rlmeta.policy.lora import load_adapter

        load_adapter(policy, lora)
    return policy


__all__ = ["BACKENDS", "Generation", "Policy", "load_policy"]
