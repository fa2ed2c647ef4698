"""MLX policy on mlx-lm.

Sampling runs every completion of a call in one continuous batch through mlx-lm's
``BatchGenerator`` (KV cache, finished rows dropped as they stop). Teacher-forced
log-probs use right-padded rows (a causal model needs no mask for them) and gather the
completion positions, so ``sequence_logprobs`` is differentiable under ``nn.value_and_grad``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p

from rlmeta.io import atomic_dir, write_json
from rlmeta.policy.base import (Generation, Prompts, as_token_ids, copy_extra_files, encode_prompts, finish,
                                pad_token_id, read_config, stop_token_ids)

LOGITS_BUDGET = 2**27
"""Float32 logits elements held at once by ``MLXPolicy.logprobs`` (512 MiB)."""


def make_sampler(temperature: float, top_p: float = 1.0):
    """Sampler over log-probs: temperature first, then top-p, as transformers does.

    (``mlx_lm.sample_utils.make_sampler`` applies top-p before the temperature.)
    """
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array) -> mx.array:
        x = logprobs * (1.0 / temperature)
        if top_p < 1.0:
            x = apply_top_p(x - mx.logsumexp(x, axis=-1, keepdims=True), top_p)
        return mx.random.categorical(x)

    return sample


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
        self.model = model
        self.wrapper = tokenizer  # mlx_lm TokenizerWrapper
        self.tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.config = dict(config)
        self.source = source
        self.stop_ids = stop_token_ids(self.tokenizer, self.config.get("eos_token_id"))
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
        """``n`` completions per prompt in one batch; deterministic for a seed."""
        ids = as_token_ids(self.tokenizer, prompts)
        rows = [(i, s) for i in range(len(ids)) for s in range(n)]
        if not rows:
            return []
        mx.random.seed(seed)
        gen = BatchGenerator(self.model, max_tokens=max_new_tokens, stop_tokens=[[t] for t in self.stop_ids],
                             sampler=make_sampler(temperature, top_p), completion_batch_size=len(rows),
                             prefill_batch_size=len(rows))
        uids = gen.insert([ids[i] for i, _ in rows], [max_new_tokens] * len(rows))
        tokens = {u: [] for u in uids}
        logps = {u: [] for u in uids}
        t = temperature if temperature > 0 else 1.0
        while responses := gen.next_generated():
            step = mx.stack([r.logprobs for r in responses]) * (1.0 / t)
            picked = mx.array([r.token for r in responses])[:, None]
            lp = mx.take_along_axis(step, picked, axis=-1)[:, 0] - mx.logsumexp(step, axis=-1)
            for r, v in zip(responses, lp.tolist()):
                tokens[r.uid].append(r.token)
                logps[r.uid].append(v)
        gen.close()
        return [finish(self.tokenizer, i, s, ids[i], tokens[u], logps[u], self.stop_ids)
                for (i, s), u in zip(rows, uids)]

    def logprobs(self, prompt_ids, completion_ids, temperature: float = 1.0) -> list[np.ndarray]:
        """Teacher-forced log-probs of each completion token, batched under ``LOGITS_BUDGET``."""
        out: list[np.ndarray] = []
        vocab = self.config.get("vocab_size", 1)
        t = max((len(c) for c in completion_ids), default=1) or 1
        chunk = max(1, LOGITS_BUDGET // (t * vocab))
        for k in range(0, len(prompt_ids), chunk):
            p, c = prompt_ids[k:k + chunk], completion_ids[k:k + chunk]
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
            self.tokenizer.save_pretrained(tmp)
            copy_extra_files(self.source, tmp)
        return Path(path)

