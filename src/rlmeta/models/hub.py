"""Local path or hub id, and clear errors when a hub model or dataset cannot be had.

``classify_source`` tells a local folder from a hub id and rejects a local path that does not
exist (instead of taking it for a hub id and retrying the network for half a minute);
``check_hub_access`` is the start-up check that a hub repository is in the local cache or
reachable; ``hub_errors`` turns a failed download inside a step into one ``HubUnavailable`` line.
``trust_remote_code`` is never enabled.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rlmeta.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_FOUND = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}
HUB_TIMEOUT_S = 10.0
"""Seconds the start-up check waits for the hub before calling it unreachable."""


class HubUnavailable(UserError):
    """A hub model or dataset could not be fetched; the message says what to do."""


def is_hub_id(id_or_path: str | Path) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    s = str(id_or_path)
    return not Path(s).expanduser().exists() and bool(_HUB_ID.match(s)) and not s.startswith((".", "~", "/"))


def classify_source(source: str, key: str, base: str | Path = ".") -> str:
    """``"local"`` for an existing path, ``"hub"`` for a hub id; ``UserError`` for a local path that is missing.

    ``owner/name`` is a hub id unless its first part is a local folder (``resources/gsm8k_typo`` is a
    missing path under ``resources/``, not a hub repository)."""
    path = Path(base) / Path(source).expanduser()
    if path.exists():
        return "local"
    first = Path(source).parts[0] if Path(source).parts else ""
    if is_hub_id(source) and not (Path(base) / first).is_dir():
        return "hub"
    why = f" (not taken for a hub id: '{first}' is a local folder)" if is_hub_id(source) else ""
    where = path.parent if path.parent.is_dir() else None
    hint = f"; {where} holds: {', '.join(sorted(p.name for p in where.iterdir())[:8])}" if where is not None else ""
    raise UserError(f"{key}: {source} does not exist{why}{hint}")


def _message(id_or_path: str, key: str, error: BaseException) -> str:
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(type(e).__name__ in _NOT_FOUND for e in chain):
        return (f"{key}: {id_or_path} is not on the Hugging Face hub, is gated, or lacks the revision asked for "
                f"({type(error).__name__}): check the id and revision, or log in with `hf auth login`")
    return (f"{key}: cannot download {id_or_path} from the Hugging Face hub (no network?): use a local path, or "
            f"pre-download it with `hf download {id_or_path}` where there is a network")


@contextlib.contextmanager
def hub_errors(id_or_path: str, key: str = "model") -> Iterator[None]:
    """Turn a failed hub fetch of ``id_or_path`` inside the block into one clear ``HubUnavailable``."""
    try:
        yield
    except (OSError, ConnectionError) as e:  # hub errors are OSError subclasses (transformers wraps them too)
        if not is_hub_id(id_or_path):
            raise
        raise HubUnavailable(_message(id_or_path, key, e)) from e


def in_cache(repo_id: str, repo_type: str = "model", revision: str | None = None) -> bool:
    """True when the local Hugging Face cache holds a snapshot of the repository."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True,
                          allow_patterns=["*.json"])
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def check_hub_access(repo_id: str, key: str, repo_type: str = "model", revision: str | None = None) -> None:
    """``HubUnavailable`` unless the repository is cached locally or the hub answers for it (start-up check)."""
    if in_cache(repo_id, repo_type, revision):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        kind_flag = " --repo-type dataset" if repo_type == "dataset" else ""
        raise HubUnavailable(f"{key}: {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                             f"pre-download it with `hf download {repo_id}{kind_flag}`, "
                             "use a local path, or set check_hub: false for a dry run")
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:
        raise HubUnavailable(_message(repo_id, key, e) + " (or set check_hub: false for a dry run)") from None
