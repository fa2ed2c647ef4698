"""MLX policy on mlx-lm.

Sampling runs every completion of a call in one batch over mlx-lm's ``BatchKVCache``
(left-padded prompts, each prefilled once, finished rows dropped as they stop). Teacher-forced
log-probs use right-padded rows (a causal model needs no mask for them) and gather the
completion positions, so ``sequence_logprobs`` is differentiable under ``nn.value_and_grad``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_top_p

from rlmeta.io import atomic_dir, write_json
from rlmeta.models.tokenizer import save_tokenizer
from rlmeta.policy.base import (Generation, Prompts, as_token_ids, checkpoint_eos, copy_extra_files, encode_prompts,
                                eval_mode, finish, pad_token_id, read_config, stop_token_ids)

LOGITS_BUDGET = 2**27
"""Float32 logits elements held at once by ``MLXPolicy.logprobs`` (512 MiB)."""


def sample(logprobs: mx.array, top_p: float = 1.0, greedy: bool = False) -> mx.array:
    """Draw one token per row from (temperature-scaled) log-probs, top-p truncated.

    Temperature comes first, then top-p, as in transformers (``mlx_lm``'s ``make_sampler``
    applies top-p to the unscaled distribution). Inverse-CDF sampling: one uniform per row,
    far cheaper on CPU than ``mx.random.categorical``'s one Gumbel draw per vocabulary entry.
    """
    if greedy:
        return mx.argmax(logprobs, axis=-1)
    if top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    cdf = mx.cumsum(mx.exp(logprobs), axis=-1)
    u = mx.random.uniform(shape=(logprobs.shape[0], 1)) * cdf[:, -1:]
    return mx.minimum((cdf <= u).sum(axis=-1), logprobs.shape[-1] - 1)


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
                      completion_mask: mx.array, temperature: float = 1.0) -> mx.array:
    """Differentiable log-probs ``(B, T)`` of the completion tokens of right-padded rows.

    Row ``i``'s completion starts at column ``prompt_lengths[i]``; entry ``(i, j)`` is
    ``log_softmax(logits / temperature)`` of token ``input_ids[i, prompt_lengths[i] + j]``,
    zero where ``completion_mask`` is 0 (see ``pad_batch``).
    """
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
    return (chosen - mx.logsumexp(logits, axis=-1)) * completion_mask


class MLXPolicy:
    """A causal LM and its tokenizer on MLX (see ``rlmeta.policy.base.Policy``)."""

    backend = "mlx"
    lora: dict | None = None  # the lora block once adapters are attached

    def __init__(self, model: nn.Module, tokenizer, config: dict, source: str | Path | None = None):
        self.model = use_transformers_rope(model)
        self.wrapper = tokenizer  # mlx_lm TokenizerWrapper
        self.tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.config = dict(config)
        self.source = source
        eos = checkpoint_eos(source) if source is not None and Path(source).is_dir() else None
        self.stop_ids = stop_token_ids(self.tokenizer, eos or self.config.get("eos_token_id"))
        self.pad_id = pad_token_id(self.tokenizer)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32") -> "MLXPolicy":
        """Open a checkpoint folder (or hub id) with ``mlx_lm.load`` and cast it to ``dtype``."""
        import mlx_lm

        model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
        if Path(path).is_dir():
            config = read_config(path)
        model.set_dtype(getattr(mx, dtype))
        model.eval()
        return cls(model, tokenizer, config, source=path)

    def encode_prompts(self, messages_batch) -> list[list[int]]:
        return encode_prompts(self.tokenizer, messages_batch)

    def generate(self, prompts: Prompts, n: int = 1, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0) -> list[Generation]:
        """``n`` completions per prompt in one batch; deterministic for a seed.

        Each prompt is prefilled once (left-padded, ``BatchKVCache``) and its cache repeated
        ``n`` times; rows leave the batch when they emit a stop token.
        """
        ids = as_token_ids(self.tokenizer, prompts)
        if not ids or n < 1:
            return []
        with eval_mode(self.model):
            tokens, logps = self._sample(ids, n, temperature, top_p, max_new_tokens, seed)
        return [finish(self.tokenizer, k // n, k % n, ids[k // n], tokens[k], logps[k], self.stop_ids)
                for k in range(len(tokens))]

    def _sample(self, ids, n, temperature, top_p, max_new_tokens, seed):
        mx.random.seed(seed)
        inv_t = 1.0 / temperature if temperature > 0 else 1.0
        order, cache, logits = self._prefill(ids)
        if n > 1:
            logits = mx.repeat(logits, n, axis=0)
            for c in cache:
                c.keys, c.values = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0)
                c.offset, c.left_padding = mx.repeat(c.offset, n, axis=0), mx.repeat(c.left_padding, n, axis=0)
        rows = [order[j // n] * n + j % n for j in range(len(ids) * n)]  # batch row -> output row
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        stops = set(self.stop_ids)
        for step in range(max_new_tokens):
            scaled = logits.astype(mx.float32) * inv_t
            lp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
            nxt = sample(lp, top_p, greedy=temperature == 0)
            chosen = mx.take_along_axis(lp, nxt[:, None], axis=-1)[:, 0]
            for r, tok, v in zip(rows, nxt.tolist(), chosen.tolist()):
                tokens[r].append(tok)
                logps[r].append(v)
            keep = [i for i, r in enumerate(rows) if tokens[r][-1] not in stops]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                idx = mx.array(keep)
                for c in cache:
                    c.filter(idx)
                nxt, rows = nxt[idx], [rows[i] for i in keep]
            logits = lm_head(self.model, self.model.model(nxt[:, None], cache=cache))[:, -1]
        return tokens, logps

    def _prefill(self, ids: list[list[int]], groups: int = 4):
        """Prefill the prompts in ``groups`` length-sorted groups (less padding), one batch cache.

        Returns ``(order, cache, last_logits)``: batch row ``j`` holds prompt ``order[j]``.
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
            logits.append(lm_head(self.model, self.model.model(x, cache=c)[:, -1:])[:, 0])
            mx.eval(logits[-1], [cc.state for cc in c])
            if cache is None:
                cache = c
            else:
                for a, b in zip(cache, c):
                    a.extend(b)
        return order, cache, mx.concatenate(logits)

    def logprobs(self, prompt_ids, completion_ids, temperature: float = 1.0) -> list[np.ndarray]:
        """Teacher-forced log-probs of each completion token, batched under ``LOGITS_BUDGET``."""
        out: list[np.ndarray] = []
        vocab = self.config.get("vocab_size", 1)
        t = max((len(c) for c in completion_ids), default=1) or 1
        chunk = max(1, LOGITS_BUDGET // (t * vocab))
        for k in range(0, len(prompt_ids), chunk):
            p, c = prompt_ids[k:k + chunk], completion_ids[k:k + chunk]
            with eval_mode(self.model):
                lp = np.array(sequence_logprobs(self.model, *pad_batch(p, c, self.pad_id), temperature))
            out += [lp[i, :len(ci)].astype(np.float32) for i, ci in enumerate(c)]
        return out

    def save(self, path: str | Path) -> Path:
        """Atomic full checkpoint (LoRA merged) that transformers and mlx_lm both open."""
        from rlmeta.policy.lora import mlx_merged_weights

        weights = mlx_merged_weights(self.model)
        dtype = next(iter(weights.values())).dtype
        config = dict(self.config, dtype=str(dtype).split(".")[-1])
        config.pop("torch_dtype", None)
        with atomic_dir(path) as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
            write_json(tmp / "config.json", config)
            save_tokenizer(self.tokenizer, tmp)
            copy_extra_files(self.source, tmp)
        return Path(path)

