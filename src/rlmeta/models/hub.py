"""Which model a config names (built folder, local path or hub id) and clear errors when a
hub model cannot be fetched. ``trust_remote_code`` is never enabled."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_FOUND = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}


class HubUnavailable(RuntimeError):
    """A hub model could not be fetched; the message says what to do."""


def is_hub_id(id_or_path: str | Path) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    s = str(id_or_path)
    return not Path(s).expanduser().exists() and bool(_HUB_ID.match(s)) and not s.startswith((".", "~"))


def resolve_model(model_cfg: dict, backend: str, built_dir: str | Path | None = None) -> str:
    """Path or hub id to load for ``models.<name>``: the built folder for ``build``, else
    ``mlx`` (falling back to ``hf``) on the mlx backend and ``hf`` on torch."""
    if backend not in ("torch", "mlx"):
        raise ValueError(f"unknown backend {backend!r}; expected torch or mlx")
    if "build" in model_cfg:
        if built_dir is None:
            raise ValueError("a models.<name>.build model needs built_dir (the folder build_model wrote)")
        return str(built_dir)
    source = (model_cfg.get("mlx") or model_cfg.get("hf")) if backend == "mlx" else model_cfg.get("hf")
    if not source:
        raise ValueError("model config has neither build nor hf")
    return str(source)


def _message(id_or_path: str, name: str | None, key: str, error: BaseException) -> str:
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    name = name or "<name>"
    if any(type(e).__name__ in _NOT_FOUND for e in chain):
        return (f"{id_or_path} is not on the Hugging Face hub, is gated, or lacks the revision asked for "
                f"({type(error).__name__}): check models.{name}.{key} and models.{name}.revision, "
                f"or log in with `huggingface-cli login`")
    return (f"cannot download {id_or_path} from the Hugging Face hub (no network?): set models.{name}.{key} "
            f"to a local path, or pre-download with `huggingface-cli download {id_or_path}`")


@contextlib.contextmanager
def hub_errors(id_or_path: str, name: str | None = None, backend: str = "torch") -> Iterator[None]:
    """Turn a failed hub fetch of ``id_or_path`` inside the block into one clear ``HubUnavailable``."""
    try:
        yield
    except (OSError, ConnectionError) as e:  # hub errors are OSError subclasses (transformers wraps them too)
        if not is_hub_id(id_or_path):
            raise
        raise HubUnavailable(_message(id_or_path, name, "mlx" if backend == "mlx" else "hf", e)) from e


def check_loadable(id_or_path: str, backend: str, revision: str | None = None, name: str | None = None) -> str:
    """Check that a local checkpoint folder has config.json, or fetch a hub model's config through
    the backend's own hub path; returns ``id_or_path``. Raises ``HubUnavailable`` offline."""
    if not is_hub_id(id_or_path):
        if not (Path(id_or_path).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"{id_or_path}: not a checkpoint folder (no config.json) and not a hub id")
        return id_or_path
    with hub_errors(id_or_path, name, backend):
        if backend == "mlx":
            from huggingface_hub import snapshot_download  # what mlx_lm.load uses

            snapshot_download(id_or_path, revision=revision, allow_patterns=["config.json"])
        else:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(id_or_path, revision=revision, trust_remote_code=False)
    return id_or_path


def load_model(id_or_path: str, backend: str, revision: str | None = None, name: str | None = None):
    """``(model, tokenizer)`` from transformers (float32 for our checkpoints, else the stored
    dtype) or ``mlx_lm.load``, with hub failures reported by ``hub_errors``."""
    with hub_errors(id_or_path, name, backend):
        if backend == "mlx":
            import mlx_lm

            return mlx_lm.load(id_or_path, revision=revision)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(revision=revision, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(id_or_path, dtype="auto", **kw)
        return model, AutoTokenizer.from_pretrained(id_or_path, **kw)
