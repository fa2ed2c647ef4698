"""Rewards registered for the length of a test (toy tasks with a known answer)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rlmeta.rewards import REGISTRY, register


@contextlib.contextmanager
def registered(name: str, fn: Callable, description: str = "test reward", batched: bool = False) -> Iterator[str]:
    """Register ``fn`` as reward ``name`` inside the block (its parameters are checked as for built-ins)."""
    register(name, description, batched=batched)(fn)
    try:
        yield name
    finally:
        REGISTRY.pop(name, None)


def digit_share(completion, reference=None, prompt=None):
    """Share of the completion's non-space characters that are digits (the trainer tests' toy task: a tiny random
    model starts near 0.03 and the answer is known, digits only: 1.0)."""
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / max(1, len(chars))
