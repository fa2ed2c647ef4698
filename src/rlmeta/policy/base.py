"""Backend-neutral pieces of a policy: the ``Generation`` record, the ``Policy`` protocol and
``BasePolicy``, the shell both backends share (prompt encoding, stop tokens, the generation and
log-prob wrappers); a backend supplies its sampling loop, its teacher-forced log-probs and its save.
Checkpoints are the portable folders of ``rlmeta.checkpoints``.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Messages = list[dict]
Prompts = Sequence[Messages] | Sequence[Sequence[int]]

STOP_TOKENS = ("<|im_end|>",)
"""Token strings that end a completion besides the tokenizer's and config's eos ids."""

LOGITS_BUDGET = 2**27
"""Float32 logits elements held at once by ``BasePolicy.logprobs`` (512 MiB)."""


@dataclass
class Generation:
    """One sampled completion.

    ``token_ids`` include the stop token when one was produced; ``logprobs[i]`` is the
    log-probability of ``token_ids[i]`` under ``log_softmax(logits / temperature)`` (before
    top-p truncation; under ``log_softmax(logits)`` when temperature is 0). ``text`` is the
    decoded completion without special tokens.
    """

    prompt_index: int
    sample_idx: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


@contextmanager
def eval_mode(model):
    """Run with dropout off (torch or MLX module), then restore the training flag."""
    was = model.training
    model.train(False)
    try:
        yield model
    finally:
        model.train(was)


def is_messages(prompts: Prompts) -> bool:
    """True when ``prompts`` are chat message lists rather than token-id lists."""
    return bool(prompts) and bool(prompts[0]) and isinstance(prompts[0][0], dict)


def prompt_text(tokenizer, messages: Messages, chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The chat template of ``messages`` with the generation prompt, as text. ``chat_template_kwargs``
    (``train.chat_template_kwargs``, e.g. ``{"enable_thinking": False}`` for Qwen3) go to the template."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                         **dict(chat_template_kwargs or {}))


def encode_prompts(tokenizer, messages_batch: Sequence[Messages],
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Apply the chat template with the generation prompt (and ``chat_template_kwargs``); returns token ids."""
    return [tokenizer.encode(prompt_text(tokenizer, m, chat_template_kwargs), add_special_tokens=False)
            for m in messages_batch]


def as_token_ids(tokenizer, prompts: Prompts, chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids of ``prompts`` (messages are chat-templated with ``chat_template_kwargs``, id lists are copied)."""
    if is_messages(prompts):
        return encode_prompts(tokenizer, prompts, chat_template_kwargs)
    return [[int(t) for t in p] for p in prompts]


def stop_token_ids(tokenizer, config_eos: int | Sequence[int] | None = None) -> list[int]:
    """Sorted ids that end a completion: ``<|im_end|>``, the tokenizer's eos and the config's."""
    ids = set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if config_eos is not None:
        ids.update([int(config_eos)] if isinstance(config_eos, int) else (int(i) for i in config_eos))
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """The pad id (``<|endoftext|>`` for Qwen), falling back to eos, then 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from any parts (stable across runs and machines)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def finish(tokenizer, prompt_index: int, sample_idx: int, prompt_ids: list[int], token_ids: list[int],
           logprobs: list[float], stop_ids: Sequence[int]) -> Generation:
    """Build a ``Generation``; the finish reason is ``stop`` iff the last token is a stop id."""
    stopped = bool(token_ids) and token_ids[-1] in stop_ids
    return Generation(
        prompt_index=prompt_index,
        sample_idx=sample_idx,
        prompt_ids=list(prompt_ids),
        token_ids=list(token_ids),
        logprobs=[float(x) for x in logprobs],
        text=tokenizer.decode(token_ids, skip_special_tokens=True),
        finish_reason="stop" if stopped else "length",
    )


def read_config(path: str | Path) -> dict:
    """The checkpoint's ``config.json``."""
    return json.loads((Path(path) / "config.json").read_text())


def checkpoint_eos(path: str | Path) -> list[int]:
    """Eos ids named by a local checkpoint's config.json and generation_config.json."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = Path(path) / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids


@dataclass(frozen=True)
class Shaping:
    """How a draw is shaped, in transformers' ``generate`` order: the repetition penalty on the raw logits
    (Keskar et al. 2019, CTRL: a logit of a token already in the prompt or the completion is divided by the
    penalty when positive, multiplied when negative), then the temperature, top-k, top-p (renormalised after
    top-k) and min-p (Nguyen et al. 2024: drop tokens below ``min_p`` x the top token's probability). The
    recorded log-probs stay the model's at the temperature, untouched by any of these, as TRL computes them
    for the policy ratio. 0 / 1.0 / 0.0 / 1.0 switch each off."""

    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


class BasePolicy(ABC):
    """The shared shell of ``MLXPolicy`` and ``TorchPolicy``.

    Subclasses set ``backend`` and implement ``_sample(ids, n, temperature, shaping, max_new_tokens, seed)``
    -> (token lists, log-prob lists) in output-row order, ``_logprob_rows(prompt_ids, completion_ids,
    temperature)`` -> (B, T) array, and ``save``.

    ``chat_template_kwargs`` (``train.chat_template_kwargs``, set by ``load_policy``): keyword arguments of the
    chat template whenever this policy encodes messages (``encode_prompts``, ``generate`` given messages).
    """

    backend = ""
    chat_template_kwargs: dict[str, Any]

    def __init__(self, model, tokenizer, config: dict, source: str | Path | None = None):
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, dict(config), source
        self.chat_template_kwargs = {}
        eos = checkpoint_eos(source) if source is not None and Path(source).is_dir() else None
        self.stop_ids = stop_token_ids(tokenizer, eos or self.config.get("eos_token_id"))
        self.pad_id = pad_token_id(tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size") or len(self.tokenizer))

    def encode_prompts(self, messages_batch: Sequence[Messages]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, messages_batch, self.chat_template_kwargs)

    def generate(self, prompts: Prompts, n: int = 1, *, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, max_new_tokens: int = 128,
                 seed: int = 0) -> list[Generation]:
        """``n`` completions per prompt in one batch, prompt-major then sample order; deterministic for a seed.
        ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``: see ``Shaping``."""
        ids = as_token_ids(self.tokenizer, prompts, self.chat_template_kwargs)
        if not ids or n < 1:
            return []
        shaping = Shaping(top_p, top_k, min_p, repetition_penalty)
        with eval_mode(self.model):
            tokens, logps = self._sample(ids, n, temperature, shaping, max_new_tokens, seed)
        return [finish(self.tokenizer, k // n, k % n, ids[k // n], tokens[k], logps[k], self.stop_ids)
                for k in range(len(tokens))]

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                 temperature: float = 1.0) -> list[np.ndarray]:
        """Teacher-forced log-probs of each completion token (float32), batched under ``LOGITS_BUDGET``."""
        out: list[np.ndarray] = []
        t = max((len(c) for c in completion_ids), default=1) or 1
        chunk = max(1, LOGITS_BUDGET // (t * self.vocab_size))
        for k in range(0, len(prompt_ids), chunk):
            p, c = prompt_ids[k:k + chunk], completion_ids[k:k + chunk]
            with eval_mode(self.model):
                lp = self._logprob_rows(p, c, temperature)
            out += [np.asarray(lp[i, :len(ci)], dtype=np.float32) for i, ci in enumerate(c)]
        return out

    @abstractmethod
    def _sample(self, ids: list[list[int]], n: int, temperature: float, shaping: Shaping, max_new_tokens: int,
                seed: int) -> tuple[list[list[int]], list[list[float]]]:
        """Sampled token ids and their log-probs, one list per output row (prompt-major, then sample)."""

    @abstractmethod
    def _logprob_rows(self, prompt_ids, completion_ids, temperature: float):
        """(B, T) teacher-forced log-probs of one chunk of completions (zero past each completion)."""

    @abstractmethod
    def save(self, path: str | Path, extra=None) -> Path:
        """Write a portable checkpoint atomically (LoRA adapters merged in); ``extra(folder)`` adds files."""


Policy = BasePolicy
"""What rollout, training and evaluation need from a language model, on either backend."""
