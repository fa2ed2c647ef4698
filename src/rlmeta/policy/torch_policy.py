"""Torch policy on transformers.

Sampling is a compact batched loop over a KV cache: left-padded prompts, every completion of
a call in one batch, rows that stopped are dropped from the batch and cache, sampling draws
from a seeded ``torch.Generator`` (temperature, then top-p). Only the sampled tokens'
log-probs are kept, never whole logit rows. ``sequence_logprobs`` is the differentiable
teacher-forced counterpart the trainers use.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rlmeta import checkpoints
from rlmeta.policy.base import BasePolicy, Shaping

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: ``n``, else ``RLMETA_TORCH_THREADS``, else at most the cores
    this process may use (torch may count more). Small models decode fastest on 1 thread when
    the cores are shared."""
    n = n or int(os.environ.get("RLMETA_TORCH_THREADS", "0")) or None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n:
        torch.set_num_threads(n)
    elif torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def decode_cache(config):
    """transformers' ``DynamicCache`` for ``config``, its full-attention layers replaced by ``growing_layer()``'s
    (sliding-window and other layer types stay as transformers builds them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    grow = growing_layer()
    cache.layers = [grow() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def growing_layer():
    """The ``GrowingLayer`` class (defined on first use: importing this module does not import transformers)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """``DynamicLayer`` whose keys and values live in buffers grown ``CHUNK`` positions at a time, and are
        handed out as views: ``DynamicLayer.update`` concatenates the whole cache at every decode step, 24% of a
        256-row decode step of the tiny model on the CPU (the same outputs 1.14x faster, docs/benchmarks.md).
        Kept in step: update, batch repeat and select, crop, reset."""

        CHUNK = 256

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.length, self._k, self._v = 0, None, None

        def _views(self):
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            b, h, t, d = key_states.shape
            if self._k is None or self.length + t > self._k.shape[2]:
                cap = -(-(self.length + t) // self.CHUNK) * self.CHUNK
                k, v = key_states.new_empty(b, h, cap, d), value_states.new_empty(b, h, cap, value_states.shape[-1])
                if self.length:
                    k[:, :, :self.length], v[:, :, :self.length] = self.keys, self.values
                self._k, self._v = k, v
            self._k[:, :, self.length:self.length + t] = key_states
            self._v[:, :, self.length:self.length + t] = value_states
            self.length += t
            self._views()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.get_seq_length() > 0:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove >= 0 or not self.is_initialized or self._k is None:
                return super().crop(tokens_to_remove)  # transformers' checks and no-ops
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    return GrowingLayer


def pad_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int = 0,
              device=None):
    """Left-padded prompts then right-padded completions, the layout ``sequence_logprobs`` takes.

    Returns ``(input_ids (B, P+T), attention_mask (B, P+T), completion_mask (B, T))`` as int64,
    int64 and float32 tensors.
    """
    p = max(len(x) for x in prompt_ids)
    t = max(1, max(len(c) for c in completion_ids))
    ids, attn, cmask = [], [], []
    for x, c in zip(prompt_ids, completion_ids):
        lp, rp = p - len(x), t - len(c)
        ids.append([pad_id] * lp + list(x) + list(c) + [pad_id] * rp)
        attn.append([0] * lp + [1] * (len(x) + len(c)) + [0] * rp)
        cmask.append([1.0] * len(c) + [0.0] * rp)
    return (torch.tensor(ids, device=device), torch.tensor(attn, device=device),
            torch.tensor(cmask, dtype=torch.float32, device=device))


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Differentiable log-probs ``(B, T)`` of the last ``T = completion_mask.shape[1]`` columns.

    Entry ``(i, j)`` is ``log_softmax(logits / temperature)`` of ``input_ids[i, -T + j]``, zero
    where ``completion_mask`` is 0. Only ``T + 1`` logit rows are computed (``logits_to_keep``).
    """
    t = completion_mask.shape[1]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature not in (0, 1):
        logits = logits / temperature
    chosen = logits.gather(-1, input_ids[:, -t:, None]).squeeze(-1)
    lp = chosen - logits.logsumexp(-1)
    return torch.where(completion_mask > 0, lp, torch.zeros_like(lp))


def shape(logits: torch.Tensor, shaping: Shaping) -> torch.Tensor:
    """Top-k, top-p and min-p (``Shaping``) applied to (temperature-scaled) logits, in transformers' order;
    top-k and min-p are transformers' own warpers, top-p a sort and a cumulative sum (the same rule as
    ``TopPLogitsWarper``, without its float32 round trip)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper

    if 0 < shaping.top_k < logits.shape[-1]:
        logits = TopKLogitsWarper(shaping.top_k)(None, logits)
    if shaping.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= shaping.top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if shaping.min_p > 0.0:
        logits = MinPLogitsWarper(shaping.min_p)(None, logits)
    return logits


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, transformers' ``RepetitionPenaltyLogitsProcessor`` rule over a (B, V) mask of
    the tokens each row has seen (its prompt and completion so far) instead of a padded (B, L) id matrix."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample(logits: torch.Tensor, shaping: Shaping, generator: torch.Generator) -> torch.Tensor:
    """One token per row from (temperature-scaled) logits, shaped by top-k / top-p / min-p (inverse-CDF
    draw: one uniform per row, far cheaper on CPU than ``torch.multinomial``)."""
    cdf = shape(logits, shaping).softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)


class TorchPolicy(BasePolicy):
    """A causal LM and its tokenizer on torch (see ``rlmeta.policy.base.BasePolicy``)."""

    backend = "torch"

    def __init__(self, model, tokenizer, source: str | Path | None = None):
        super().__init__(model, tokenizer, model.config.to_dict(), source)
        set_threads()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", device: str | None = None) -> TorchPolicy:
        """Open a checkpoint folder (or hub id) with transformers, on CUDA when there is one."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        return cls(model, tokenizer, source=path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _sample(self, ids, n, temperature, shaping, max_new_tokens, seed):
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        input_ids, attn, _ = pad_batch(ids, [[]] * len(ids), self.pad_id, dev)
        input_ids, attn = input_ids[:, :-1], attn[:, :-1]  # drop the empty completion column
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        stops = torch.tensor(self.stop_ids, device=dev)
        alive = torch.arange(len(ids) * n, device=dev)  # output row of each batch row
        tokens: list[list[int]] = [[] for _ in range(len(ids) * n)]
        logps: list[list[float]] = [[] for _ in range(len(ids) * n)]
        cache = decode_cache(self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # each prompt once, then n copies of its cache
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        cache.batch_repeat_interleave(n)
        attn, positions = attn.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
        penalty = shaping.repetition_penalty
        if penalty != 1.0:  # (B, V): the tokens of each row's prompt, then of its completion as it grows
            seen = torch.zeros(len(alive), logits.shape[-1], dtype=torch.bool, device=dev)
            for j in range(len(alive)):
                seen[j, torch.tensor(ids[j // n], device=dev)] = True
        for step in range(max_new_tokens):
            scaled = logits / temperature if temperature > 0 else logits
            draw = scaled if penalty == 1.0 else penalize(logits, seen, penalty) / (temperature or 1.0)
            nxt = sample(draw, shaping, gen) if temperature > 0 else draw.argmax(-1)
            # recorded: the model's own log-probs at the temperature (no penalty, no filter)
            lp = scaled.gather(-1, nxt[:, None])[:, 0] - scaled.logsumexp(-1)
            for r, tok, v in zip(alive.tolist(), nxt.tolist(), lp.tolist()):
                tokens[r].append(tok)
                logps[r].append(v)
            if penalty != 1.0:
                seen[torch.arange(len(alive), device=dev), nxt] = True
            keep = ~torch.isin(nxt, stops)
            if not keep.any() or step == max_new_tokens - 1:
                break
            if not keep.all():
                idx = keep.nonzero()[:, 0]
                cache.batch_select_indices(idx)
                alive, nxt, attn, positions = alive[idx], nxt[idx], attn[idx], positions[idx]
                if penalty != 1.0:
                    seen = seen[idx]
            attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()
        return tokens, logps

    @torch.no_grad()
    def _logprob_rows(self, prompt_ids, completion_ids, temperature):
        batch = pad_batch(prompt_ids, completion_ids, self.pad_id, self.device)
        lp = sequence_logprobs(self.model, *batch, temperature)
        return lp.cpu().numpy()

    def save(self, path: str | Path, extra=None) -> Path:
        """Atomic portable checkpoint (LoRA merged) that transformers and mlx_lm both open."""
        return checkpoints.save_torch(self.model, self.tokenizer, path, self.source, extra=extra)
