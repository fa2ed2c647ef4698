"""Backend-neutral pieces of a policy: the ``Generation`` record, the ``Policy`` protocol and
helpers both backends share (prompt encoding, stop tokens, seeds, checkpoint files).

A checkpoint is one folder that ``transformers`` and ``mlx_lm.load`` both open as-is:
``config.json``, ``model.safetensors`` (HF parameter names), ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

Messages = list[dict]
Prompts = Sequence[Messages] | Sequence[Sequence[int]]

STOP_TOKENS = ("<|im_end|>",)
"""Token strings that end a completion besides the tokenizer's and config's eos ids."""

EXTRA_FILES = ("generation_config.json",)
"""Files copied verbatim from the source checkpoint when a policy is saved."""


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


@runtime_checkable
class Policy(Protocol):
    """What rollout, training and evaluation need from a language model, on either backend."""

    backend: str
    tokenizer: Any
    model: Any

    def encode_prompts(self, messages_batch: Sequence[Messages]) -> list[list[int]]:
        """Chat-template token ids, with the assistant generation prompt."""

    def generate(self, prompts: Prompts, n: int = 1, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0) -> list[Generation]:
        """``n`` completions per prompt, prompt-major then sample order."""

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                 temperature: float = 1.0) -> list[np.ndarray]:
        """Teacher-forced log-probs of each completion token (float32 arrays)."""

    def save(self, path: str | Path) -> Path:
        """Write a full checkpoint atomically (LoRA adapters merged in)."""


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


def encode_prompts(tokenizer, messages_batch: Sequence[Messages]) -> list[list[int]]:
    """Apply the chat template with the generation prompt; returns token ids."""
    out = []
    for messages in messages_batch:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def as_token_ids(tokenizer, prompts: Prompts) -> list[list[int]]:
    """Token ids of ``prompts`` (messages are chat-templated, id lists are copied)."""
    if is_messages(prompts):
        return encode_prompts(tokenizer, prompts)
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


def copy_extra_files(src: str | Path | None, dst: Path) -> None:
    """Copy ``EXTRA_FILES`` from ``src`` to ``dst`` when present and not written already."""
    if src is None or not Path(src).is_dir():
        return
    for name in EXTRA_FILES:
        if (Path(src) / name).exists() and not (dst / name).exists():
            shutil.copy(Path(src) / name, dst / name)


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
