"""MLX policy on mlx-lm.

Sampling runs every completion of a call in one batch over mlx-lm's ``BatchKVCache``
(left-padded prompts, each prefilled once, finished rows dropped as they stop). Teacher-forced
log-probs use right-padded rows (a causal model needs no mask for them) and gather the
completion positions, so ``sequence_logprobs`` is differentiable under ``nn.value_and_grad``; on
a CPU device Qwen2/Qwen3 models take the packed path of ``rlmeta.policy.mlx_packed``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from rlmeta import checkpoints
from rlmeta.policy import mlx_packed
from rlmeta.policy.base import BasePolicy, Shaping, read_config
from rlmeta.policy.mlx_compat import lm_head, use_transformers_rope

UNSHAPED = Shaping()


def shape(logprobs: mx.array, shaping: Shaping) -> mx.array:
    """Top-k, top-p and min-p (``Shaping``) applied to (temperature-scaled) log-probs, with mlx-lm's own
    filters; renormalised after top-k so that top-p measures the mass of what is left, as transformers does."""
    if 0 < shaping.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, shaping.top_k)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if shaping.top_p < 1.0:
        logprobs = apply_top_p(logprobs, shaping.top_p)
    if shaping.min_p > 0.0:
        logprobs = apply_min_p(logprobs, shaping.min_p)
    return logprobs


def penalize(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """CTRL's repetition penalty on raw logits, per row: ``seen`` (B, V) marks the tokens of each row's prompt
    and completion so far (mlx-lm's ``make_repetition_penalty`` takes one sequence and its last 20 tokens;
    transformers, which TRL uses, takes every token of each row: this is transformers' rule, batched)."""
    return mx.where(seen, mx.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample(logprobs: mx.array, shaping: Shaping = UNSHAPED, greedy: bool = False) -> mx.array:
    """Draw one token per row from (temperature-scaled) log-probs, shaped by top-k / top-p / min-p.

    Temperature comes first, then the filters, as in transformers (``mlx_lm``'s ``make_sampler``
    applies top-p to the unscaled distribution). Inverse-CDF sampling: one uniform per row,
    far cheaper on CPU than ``mx.random.categorical``'s one Gumbel draw per vocabulary entry.
    """
    if greedy:
        return mx.argmax(logprobs, axis=-1)
    logprobs = shape(logprobs, shaping)
    cdf = mx.cumsum(mx.exp(logprobs), axis=-1)
    u = mx.random.uniform(shape=(logprobs.shape[0], 1)) * cdf[:, -1:]
    return mx.minimum((cdf <= u).sum(axis=-1), logprobs.shape[-1] - 1)


def pad_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-padded ``prompt + completion`` rows for ``sequence_logprobs``.

    Returns ``(input_ids (B, L) int32, prompt_lengths (B,) int32, completion_mask (B, T) float32)``
    with ``T`` the longest completion.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    t = max(1, max(len(c) for c in completion_ids))
    input_ids = mx.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=mx.int32)
    prompt_lengths = mx.array([len(p) for p in prompt_ids], dtype=mx.int32)
    mask = mx.array([[1.0] * len(c) + [0.0] * (t - len(c)) for c in completion_ids], dtype=mx.float32)
    return input_ids, prompt_lengths, mask


def sequence_logprobs(model: nn.Module, input_ids: mx.array, prompt_lengths: mx.array,
                      completion_mask: mx.array, temperature: float = 1.0, entropy: bool = False):
    """Differentiable log-probs ``(B, T)`` of the completion tokens of right-padded rows.

    Row ``i``'s completion starts at column ``prompt_lengths[i]``; entry ``(i, j)`` is
    ``log_softmax(logits / temperature)`` of token ``input_ids[i, prompt_lengths[i] + j]``,
    zero where ``completion_mask`` is 0 (see ``pad_batch``). ``entropy``: return ``(logprobs, entropies)``,
    the second the entropy (nats, no gradient) of ``softmax(logits / temperature)`` at each of those
    positions, from the same forward pass.

    On a CPU device, float32 Qwen2/Qwen3 models take ``packed_logprobs`` (the same values to
    float32 rounding, ~25x faster on a GRPO batch); other models and devices run the padded batch
    through mlx-lm.
    """
    plan = mlx_packed.PackedPlan.of(model, input_ids, prompt_lengths, completion_mask) if mlx_packed.HOST_GEMM else None
    if plan is not None:
        return mlx_packed.packed_logprobs(model, plan, completion_mask, temperature, entropy=entropy)
    b, width = input_ids.shape
    t = completion_mask.shape[1]
    cols = mx.minimum(prompt_lengths[:, None] + mx.arange(t)[None, :], width - 1)  # (B, T) targets
    hidden = model.model(input_ids)
    hidden = mx.take_along_axis(hidden, (cols - 1)[..., None], axis=1)  # states that predict them
    logits = lm_head(model, hidden).astype(mx.float32)
    if temperature not in (0, 1):
        logits = logits * (1.0 / temperature)
    targets = mx.take_along_axis(input_ids, cols, axis=1)
    chosen = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    lp = (chosen - mx.logsumexp(logits, axis=-1)) * completion_mask
    if entropy:
        from rlmeta.rl.objectives_mlx import token_entropy

        return lp, mx.stop_gradient(token_entropy(logits)) * completion_mask
    return lp


class MLXPolicy(BasePolicy):
    """A causal LM and its tokenizer on MLX (see ``rlmeta.policy.base.BasePolicy``)."""

    backend = "mlx"
    lora: dict | None = None  # the lora block once adapters are attached

    def __init__(self, model: nn.Module, tokenizer, config: dict, source: str | Path | None = None):
        self.wrapper = tokenizer  # mlx_lm TokenizerWrapper
        super().__init__(use_transformers_rope(model), getattr(tokenizer, "_tokenizer", tokenizer), config, source)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32") -> MLXPolicy:
        """Open a checkpoint folder (or hub id) with ``mlx_lm.load`` and cast it to ``dtype``."""
        import mlx_lm

        model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
        if Path(path).is_dir():
            config = read_config(path)
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())  # cast now, so the loaded float32 arrays are freed before training starts
        model.eval()
        return cls(model, tokenizer, config, source=path)

    def _sample(self, ids, n, temperature, shaping, max_new_tokens, seed):
        """Each prompt is prefilled once (left-padded, ``BatchKVCache``) and its cache repeated ``n``
        times; rows leave the batch when they emit a stop token. On the CPU device (float32 Qwen2/Qwen3) the
        forward's products and attention run in NumPy, and so do unshaped draws (``mlx_packed``: ``host_forward``,
        ``host_logits``, ``host_draw``; the same tokens and log-probs to float32 rounding)."""
        mx.random.seed(seed)
        host = mlx_packed.HOST_GEMM and mlx_packed._packable(self.model)
        return self._sample_rows(ids, n, temperature, shaping, max_new_tokens, host)

    def _last_logits(self, x: mx.array, cache: list, host: bool):
        """Logits ``(B, V)`` of the last position after ``x (B, L)`` (NumPy on the host path), cache updated."""
        if host:
            return mlx_packed.host_logits(self.model, mlx_packed.host_forward(self.model, x, cache)[:, -1])
        return lm_head(self.model, self.model.model(x, cache=cache)[:, -1:])[:, 0]

    def _sample_rows(self, ids, n, temperature, shaping, max_new_tokens, host):
        inv_t = 1.0 / temperature if temperature > 0 else 1.0
        greedy = temperature == 0
        penalty = shaping.repetition_penalty
        draw_on_host = host and shaping == UNSHAPED  # no top-k / top-p / min-p / repetition penalty
        order, cache, logits = self._prefill(ids, host)
        if n > 1:
            logits = np.repeat(logits, n, axis=0) if host else mx.repeat(logits, n, axis=0)
            for c in cache:
                c.keys, c.values = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0)
                c.offset, c.left_padding = mx.repeat(c.offset, n, axis=0), mx.repeat(c.left_padding, n, axis=0)
        rows = [order[j // n] * n + j % n for j in range(len(ids) * n)]  # batch row -> output row
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        stops = set(self.stop_ids)
        if penalty != 1.0:  # (B, V): the tokens of each row's prompt, then of its completion as it grows
            seen = np.zeros((len(rows), logits.shape[-1]), dtype=bool)
            for j, r in enumerate(rows):
                seen[j, ids[r // n]] = True
        for step in range(max_new_tokens):
            if draw_on_host:  # the same uniforms as sample() draws, so the same tokens up to float32 rounding
                u = None if greedy else np.asarray(mx.random.uniform(shape=(len(rows), 1)))
                nxt, chosen = mlx_packed.host_draw(logits, inv_t, u)
                drawn, chosen = nxt.tolist(), chosen.tolist()
            else:
                raw = (mx.array(logits) if host else logits).astype(mx.float32)
                scaled = raw * inv_t
                lp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)  # recorded: the model's own log-probs
                draw = lp
                if penalty != 1.0:
                    draw = penalize(raw, mx.array(seen), penalty) * inv_t
                    draw = draw - mx.logsumexp(draw, axis=-1, keepdims=True)
                nxt = sample(draw, shaping, greedy=greedy)
                chosen = mx.take_along_axis(lp, nxt[:, None], axis=-1)[:, 0]
                drawn, chosen = nxt.tolist(), chosen.tolist()
            for r, tok, v in zip(rows, drawn, chosen):
                tokens[r].append(tok)
                logps[r].append(v)
            if penalty != 1.0:
                seen[np.arange(len(rows)), drawn] = True
            keep = [i for i, r in enumerate(rows) if tokens[r][-1] not in stops]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                idx = mx.array(keep)
                for c in cache:
                    c.filter(idx)
                drawn, rows = [drawn[i] for i in keep], [rows[i] for i in keep]
                if penalty != 1.0:
                    seen = seen[keep]
            x = mx.array(drawn, dtype=mx.int32)[:, None]
            logits = self._last_logits(x, cache, host)
        return tokens, logps

    def _prefill(self, ids: list[list[int]], host: bool = False, groups: int = 4):
        """Prefill the prompts in ``groups`` length-sorted groups (less padding), one batch cache.

        Returns ``(order, cache, last_logits)``: batch row ``j`` holds prompt ``order[j]``; the logits are
        NumPy on the ``host`` path (see ``_sample``).
        """
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        size = -(-len(ids) // groups)
        cache, logits = None, []
        for k in range(0, len(order), size):
            part = [ids[i] for i in order[k:k + size]]
            width = max(len(p) for p in part)
            pads = [width - len(p) for p in part]
            c = [BatchKVCache(pads) for _ in self.model.layers]
            x = mx.array([[self.pad_id] * m + list(p) for p, m in zip(part, pads)], dtype=mx.int32)
            logits.append(self._last_logits(x, c, host))
            mx.eval([cc.state for cc in c] + ([] if host else [logits[-1]]))
            if cache is None:
                cache = c
            else:
                for a, b in zip(cache, c):
                    a.extend(b)
        return order, cache, np.concatenate(logits) if host else mx.concatenate(logits)

    def _logprob_rows(self, prompt_ids, completion_ids, temperature):
        return np.array(sequence_logprobs(self.model, *pad_batch(prompt_ids, completion_ids, self.pad_id), temperature))

    def save(self, path: str | Path, extra=None) -> Path:
        """Atomic portable checkpoint (LoRA fused) that transformers and mlx_lm both open."""
        from rlmeta.policy.lora import mlx_merged_weights

        return checkpoints.save_mlx(mlx_merged_weights(self.model), self.config, self.tokenizer, path, self.source,
                                    extra=extra)
