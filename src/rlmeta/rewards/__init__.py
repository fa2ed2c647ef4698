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

Rewards users plug in (config key ``reward_modules``, option ``--reward-modules`` of every step) are
registered by ``load_modules``: Python files, importable modules or entry points of the group
``rlmeta.rewards`` whose functions use ``register`` like the built-in ones (docs/rewards.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from rlmeta.errors import UserError

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
            raise RegistrationError(f"reward '{name}' is registered twice ({_where(REGISTRY[name].fn.__module__)} "
                                    f"and {_where(fn.__module__)})")
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


class RegistrationError(ValueError):
    """A reward name registered twice."""


class RewardModuleError(UserError, ValueError):
    """A reward module that cannot be loaded (one line naming the module and the problem)."""


ENTRY_POINT_GROUP = "rlmeta.rewards"
"""Entry-point group of installed reward modules (``[project.entry-points."rlmeta.rewards"] name = "pkg.mod"``)."""
PLUGINS: dict[str, Path] = {}
"""Module name -> source file of every reward module ``load_modules`` loaded in this process."""


def _where(module: str) -> str:
    """A module's name, or its file for a reward module loaded from a file."""
    return str(PLUGINS[module]) if module in PLUGINS and module.startswith(FILE_PREFIX) else module


FILE_PREFIX = "rlmeta_reward_plugin_"
"""Module names of reward files: the prefix and the file's path relative to the workflow folder (stable
across processes and checkouts, so that code fingerprints only change when the file does)."""


def is_file_spec(spec: str) -> bool:
    """A reward module given as a Python file (``*.py`` or a path with a folder), not as a module name."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve_spec(spec: str, base: str | os.PathLike | None = None) -> str:
    """A file spec as an absolute path (relative to ``base``, default the current folder); a name as it is."""
    return os.path.abspath(os.path.join(base or os.getcwd(), spec)) if is_file_spec(spec) else spec


def _file_module_name(path: str, base: str) -> str:
    rel = os.path.relpath(path, base)
    shown = path if rel.startswith("..") else rel
    return FILE_PREFIX + re.sub(r"\W", "_", os.path.splitext(shown)[0].strip(os.sep))


def _describe(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    msg = " ".join(str(e).split())
    return msg if isinstance(e, (RegistrationError, RewardModuleError)) else f"{type(e).__name__}: {msg}"


def _forget(module: str, before: set[str]) -> None:
    """Undo a failed load: the module and the rewards it registered before failing."""
    sys.modules.pop(module, None)
    PLUGINS.pop(module, None)
    for name in set(REGISTRY) - before:
        del REGISTRY[name]


def load_modules(specs: Iterable[str], base: str | os.PathLike | None = None) -> list[str]:
    """Import reward modules so that their ``@register`` calls run; returns their module names.

    Each spec is a Python file (a path ending in ``.py`` or with a folder, relative to ``base``, default the
    current folder), the name of an entry point of the group ``rlmeta.rewards``, or an importable module. A
    file is imported as ``rlmeta_reward_plugin_<its path relative to base>``; a module already loaded is not
    imported again (so loading the same list twice registers nothing twice). ``RewardModuleError`` (one line)
    for a missing file or module, an error while importing it, or a reward name registered twice.
    """
    base = os.path.abspath(base or os.getcwd())
    names = []
    for spec in specs:
        before = set(REGISTRY)
        if is_file_spec(spec):
            path = resolve_spec(spec, base)
            if not os.path.isfile(path):
                raise RewardModuleError(f"reward module {spec}: no such file ({path}; paths are relative to the "
                                        "workflow folder)")
            name = _file_module_name(path, base)
            if name in sys.modules and PLUGINS.get(name) == Path(path):
                names.append(name)
                continue
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name], PLUGINS[name] = module, Path(path)
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:  # any error in a user's file is reported as one line
                _forget(name, before)
                raise RewardModuleError(f"reward module {spec}: {_describe(e)}") from None
            names.append(name)
            continue
        found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        name = found[0].module if found else spec
        fresh = name not in sys.modules
        try:
            found[0].load() if found else importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if fresh:
                _forget(name, before)
            if not found and e.name is not None and (spec == e.name or spec.startswith(e.name + ".")):
                raise RewardModuleError(f"reward module '{spec}': no such file, importable module or entry point "
                                        f"of the group {ENTRY_POINT_GROUP}") from None
            raise RewardModuleError(f"reward module '{spec}': {_describe(e)}") from None
        except Exception as e:
            if fresh:
                _forget(name, before)
            raise RewardModuleError(f"reward module '{spec}': {_describe(e)}") from None
        module = sys.modules.get(name)
        if getattr(module, "__file__", None):
            PLUGINS[name] = Path(module.__file__)
        names.append(name)
    return names


from rlmeta.rewards import mathverify, reasoning_gym, text, xml  # noqa: E402,F401  (register the built-in rewards)

__all__ = ["ENTRY_POINT_GROUP", "PLUGINS", "REGISTRY", "RegistrationError", "RewardModuleError", "RewardSpec",
           "load_modules", "register", "resolve_spec", "unknown_rewards"]
