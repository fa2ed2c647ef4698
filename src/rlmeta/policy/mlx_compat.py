"""mlx-lm models with transformers' numerics, and small helpers both MLX paths share.

``TransformersRoPE`` replaces ``nn.RoPE`` so that MLX and torch agree: ``mx.fast.rope``'s own
frequencies drift from transformers' with the position (5e-5 at position 512 for a unit input),
which would break the MLX/torch parity the tests check.
"""
from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class TransformersRoPE(nn.Module):
    """``nn.RoPE`` with transformers' frequencies: ``mx.fast.rope``'s own drift from them with the
    position (5e-5 at position 512 for a unit input), which would break parity with torch.
    ``1 / base ** (2i / dims)`` is computed in float64 and rounded, as torch's float32 is."""

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000.0, scale: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.scale = dims, traditional, scale
        inv = (1.0 / base ** (np.arange(0, dims, 2) / dims)).astype(np.float32)
        self._periods = mx.array(1.0 / inv.astype(np.float64), dtype=mx.float32)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=self.scale, offset=offset,
                            freqs=self._periods)


def use_transformers_rope(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.RoPE`` of an mlx-lm model for ``TransformersRoPE`` (in place)."""
    for _, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if type(rope) is nn.RoPE:
            module.rope = TransformersRoPE(rope.dims, rope.traditional, rope.base, rope.scale)
    return model


def lm_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Output logits of a decoder's final hidden states (tied or separate head)."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


@contextmanager
def checkpointed_layers(model, enabled: bool = True):
    """Inside: the model's decoder layers recompute their activations in the backward pass (mlx-lm's own
    ``tuner.trainer.grad_checkpoint``, ``mx.checkpoint`` over each layer call). mlx-lm patches the layer class's
    ``__call__``; the class gets its own back on exit, so that sampling and the KL reference (which compute no
    gradient) and other models in the process are untouched."""
    if not enabled:
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(model.model.layers[0])
    saved = cls.__call__
    grad_checkpoint(model.model.layers[0])
    try:
        yield
    finally:
        cls.__call__ = saved

