"""The reward registry: every scorer of a completion, with its real parameters.

A reward is ``fn(completion, reference=None, prompt=None, *, <params>) -> float`` in [0, 1], or, for
scorers that are cheaper over a whole batch (math-verify in worker processes), ``fn(completions,
references, prompts, *, <params>) -> list[float]`` registered with ``batched=True``. Parameters
are keyword arguments with defaults; ``RewardSpec.check_params`` checks a config's
``reward_params`` against them (names and types), so a typo is an error, never ignored.
``RewardSpec.score`` is the one batched entry point that the score step, both trainers and the
evaluation use (through ``rlmeta.scoring``).

Task metrics (accuracies, format rates) are registered scorers too; a template names which it
reports (``rlmeta.prompts.Template.metrics``).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FIRST_ARGS = 3
"""Positional arguments every reward takes first: completion(s), reference(s), prompt(s)."""


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its function, a one-line description, its range and whether it is batched."""

    name: str
    fn: Callable
    description: str
    range: tuple[float, float] = (0.0, 1.0)
    batched: bool = False
    answer: Callable[[str], str | None] | None = None
    """For an accuracy: the completion's final answer, normalised so that equal answers compare equal
    (majority voting, maj@k, groups completions by it); None where the scorer has no single answer."""

    @property
    def params(self) -> dict[str, inspect.Parameter]:
        """The keyword parameters (name -> inspect.Parameter with its default)."""
        sig = list(inspect.signature(self.fn).parameters.values())[FIRST_ARGS:]
        for p in sig:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is p.empty:
                raise TypeError(f"reward {self.name}: parameter {p.name!r} must be a keyword with a default "
                                "(no **kwargs: unknown parameters must be errors)")
        return {p.name: p for p in sig}

    def check_params(self, given: dict, where: str = "reward_params") -> None:
        """ValueError (one line) for a parameter this reward does not have, or a value of the wrong type."""
        params = self.params
        for key, value in given.items():
            if key not in params:
                allowed = ", ".join(f"{k} (default {p.default!r})" for k, p in params.items()) or "none"
                raise ValueError(f"{where}.{key}: reward '{self.name}' has no parameter '{key}'; its parameters: "
                                 f"{allowed}")
            default = params[key].default
            numeric = (int, float)
            ok = (isinstance(value, numeric) and not isinstance(value, bool)) if isinstance(default, numeric) \
                and not isinstance(default, bool) else default is None or isinstance(value, type(default))
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = value.is_integer()
            if not ok:
                raise ValueError(f"{where}.{key} is {value!r} ({type(value).__name__}); reward '{self.name}' expects "
                                 f"{type(default).__name__} like its default {default!r}")

    def score(self, completions: Sequence[str], references: Sequence[str | None] | None = None,
              prompts: Sequence | None = None, params: dict | None = None) -> np.ndarray:
        """Scores of a batch of completions (float64 array)."""
        n = len(completions)
        refs = list(references) if references is not None else [None] * n
        prompts = list(prompts) if prompts is not None else [None] * n
        kw = params or {}
        if self.batched:
            out = self.fn(list(completions), refs, prompts, **kw)
        else:
            out = [self.fn(c, r, p, **kw) for c, r, p in zip(completions, refs, prompts)]
        return np.asarray(out, dtype=np.float64).reshape(n)


REGISTRY: dict[str, RewardSpec] = {}


def register(name: str, description: str, *, batched: bool = False, range: tuple[float, float] = (0.0, 1.0),
             answer: Callable[[str], str | None] | None = None):
    """Decorator: add a reward function to ``REGISTRY`` under ``name`` (its parameters are checked now);
    ``answer`` extracts the final answer an accuracy scores (``RewardSpec.answer``)."""
    def wrap(fn: Callable) -> Callable:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"reward '{name}' is registered twice ({REGISTRY[name].fn.__module__} and "
                             f"{fn.__module__})")
        spec = RewardSpec(name, fn, description, range, batched, answer)
        spec.params  # noqa: B018 - raises on **kwargs or parameters without defaults
        REGISTRY[name] = spec
        return fn
    return wrap


def unknown_rewards(names) -> None:
    """Raise ValueError naming the unknown rewards in ``names`` and listing the valid ones."""
    bad = [n for n in names if n not in REGISTRY]
    if bad:
        raise ValueError(f"unknown reward(s) {', '.join(map(repr, bad))}; valid rewards: {', '.join(sorted(REGISTRY))}")


from rlmeta.rewards import mathverify, text, xml  # noqa: E402,F401  (register the built-in rewards)

__all__ = ["REGISTRY", "RewardSpec", "register", "unknown_rewards"]
