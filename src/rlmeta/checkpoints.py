"""Checkpoints: one portable format for every trainer, written whole or not at all.

A model folder opens as-is in transformers (``from_pretrained``) and in mlx-lm (``mlx_lm.load``):
``config.json``, ``model.safetensors`` (transformers' parameter names, LoRA merged), the tokenizer
files with the chat template, and ``generation_config.json`` when the source has one. ``save_torch``
and ``save_mlx`` write one from either backend; resumable checkpoints add the trainer's state.

Every folder is built next to its final place and renamed in (``rlmeta.io.atomic_dir``), with a
marker, ``checkpoint.json``, written last: a folder without it was cut short. ``numbered`` lists
the numbered checkpoints of a run that are complete and readable, newest last, and warns about
(and skips) any other; ``prune`` keeps the newest few.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from rlmeta.io import atomic_dir

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
EXTRA_FILES = ("generation_config.json",)
"""Files copied verbatim from the source checkpoint when a policy is saved."""
STEP_DIR = re.compile(r"^(?:checkpoint-)?(\d+)$")
"""Numbered checkpoint folders: ``<step>`` (MLX, FOMAML) or ``checkpoint-<step>`` (TRL's naming)."""


def write_marker(folder: str | Path, **info) -> None:
    """Write the completion marker (call it last, inside the folder being built)."""
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    text = json.dumps({**info, "files": files}, indent=2, sort_keys=True, default=str)
    (Path(folder) / MARKER).write_text(text + "\n")


def is_complete(folder: str | Path) -> bool:
    """True when the folder has its marker and every file the marker lists."""
    marker = Path(folder) / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((Path(folder) / f).is_file() for f in listed)


def marker(folder: str | Path) -> dict:
    """The marker's contents (``{}`` when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def weights_finite(folder: str | Path) -> bool | None:
    """True when every tensor of the folder's safetensors files (adapters included) is finite; None when it has
    none (e.g. a FOMAML checkpoint of DCP shards, checked in memory when it was written)."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    if not files:
        return None
    try:
        import torch
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if not all(bool(torch.isfinite(st.get_tensor(k)).all()) for k in st.keys()):  # noqa: SIM118
                    return False
    except ImportError:  # an MLX-only environment
        import mlx.core as mx

        return all(bool(mx.isfinite(v).all()) for f in files for v in mx.load(str(f)).values())
    return True


def numbered(out_dir: str | Path, readable: Callable[[Path], bool] | None = None) -> list[tuple[int, Path]]:
    """Complete numbered checkpoints in ``out_dir``, by step; incomplete or unreadable ones are skipped, with a
    warning."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if not (m and p.is_dir()):
            continue
        if not is_complete(p):
            log.warning("skipping checkpoint %s: incomplete (no %s, or a file it lists is missing: cut during its "
                        "save?)",
                        p, MARKER)
            continue
        if readable is not None and not readable(p):
            log.warning("skipping checkpoint %s: it cannot be read", p)
            continue
        found.append((int(m.group(1)), p))
    return sorted(found)


def latest(out_dir: str | Path, readable: Callable[[Path], bool] | None = None) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = numbered(out_dir, readable)
    return found[-1][1] if found else None


def prune(out_dir: str | Path, keep: int, spare=()) -> None:
    """Delete all but the newest ``keep`` numbered checkpoints (complete or not), and those in ``spare``
    (e.g. the divergence guard's last good checkpoint while a condition holds)."""
    spare = {Path(p).resolve() for p in spare}
    steps = sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir()
                   if (m := STEP_DIR.match(p.name)) and p.is_dir())
    for _, p in steps[:-keep] if keep > 0 else steps:
        if p.resolve() not in spare:
            shutil.rmtree(p, ignore_errors=True)


def remove_all(out_dir: str | Path, reason: str) -> None:
    """Delete every numbered checkpoint (another run's state must not be resumed)."""
    if not Path(out_dir).is_dir():
        return
    for p in Path(out_dir).iterdir():
        if STEP_DIR.match(p.name) and p.is_dir():
            log.warning("removing %s: %s", p, reason)
            shutil.rmtree(p)


def inputs_fingerprint(*paths: str | Path) -> dict:
    """Size and modification time (ns) of every file under each local path (a model folder, a prompts table,
    a tasks folder), for a run's resume spec: checkpoints trained from another version of the same path (a
    warm start or data step that re-ran) are never resumed. Snakemake deletes a re-run job's declared outputs,
    not the numbered checkpoints beside them, so without this a re-run trained on new inputs would resume the
    old run. Not a content hash: hashing gigabytes of weights at every start would cost more than a restart
    saves, and every writer here renames a new file into place, which always gives it a new mtime. A hub id
    (no such path) maps to None."""
    out: dict = {}
    for path in map(Path, paths):
        if path.is_file():
            out[str(path)] = [path.stat().st_size, path.stat().st_mtime_ns]
        elif path.is_dir():
            out[str(path)] = {str(f.relative_to(path)): [f.stat().st_size, f.stat().st_mtime_ns]
                              for f in sorted(path.rglob("*")) if f.is_file()}
        else:
            out[str(path)] = None
    return out


def run_name(out_dir: str | Path) -> str:
    """The experiment's name for W&B: the folder above ``checkpoints/``, else the folder itself."""
    out_dir = Path(out_dir)
    return out_dir.parent.name if out_dir.name == "checkpoints" else out_dir.name


# -- the portable model folder -------------------------------------------------------------------

def _source_config(source: str | Path | None) -> dict:
    cfg = Path(source) / "config.json" if source is not None else None
    return json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}


def _write_folder(path: str | Path, write_model: Callable[[Path], None], tokenizer, source: str | Path | None,
                  extra: Callable[[Path], None] | None, info: dict) -> Path:
    """Build a model folder aside and rename it in: the model files (``write_model``), the tokenizer, the
    source's extra files, a top-level ``rope_theta`` (transformers 4.x and older mlx-lm read it there;
    5.x nests it in ``rope_parameters``), ``extra`` files (trainer state), and the marker last."""
    from rlmeta.models.tokenizer import save_tokenizer

    with atomic_dir(path) as tmp:
        write_model(tmp)
        save_tokenizer(tokenizer, tmp)
        if source is not None and Path(source).is_dir():
            for name in EXTRA_FILES:
                if (Path(source) / name).exists() and not (tmp / name).exists():
                    shutil.copy(Path(source) / name, tmp / name)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
        if rope is not None and cfg.get("rope_theta") != rope:
            cfg["rope_theta"] = rope
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
        write_marker(tmp, **info)
    return Path(path)


def save_torch(model, tokenizer, path: str | Path, source: str | Path | None = None,
               extra: Callable[[Path], None] | None = None, **info) -> Path:
    """A transformers model (peft adapters merged into a copy) as a portable folder, atomically.

    Weights keep the source checkpoint's dtype; ``use_cache`` and ``pad_token_id`` come back from the
    source config (TRL switches the cache off and mirrors the pad id into the model config).
    ``extra(tmp)`` writes more files (trainer state) before the marker."""
    import copy

    import torch

    src = _source_config(source)
    if hasattr(model, "merge_and_unload"):  # peft
        model = copy.deepcopy(model).merge_and_unload()
    dtype = getattr(torch, str(src.get("dtype") or src.get("torch_dtype") or ""), None)
    if isinstance(dtype, torch.dtype) and next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if src:  # what training changed in the config goes back to the source's values
            cfg = json.loads((tmp / "config.json").read_text())
            cfg.update(use_cache=src.get("use_cache", True), pad_token_id=src.get("pad_token_id"))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    return _write_folder(path, write_model, tokenizer, source, extra, {"backend": "torch", **info})


def save_mlx(weights: dict, config: dict, tokenizer, path: str | Path, source: str | Path | None = None,
             extra: Callable[[Path], None] | None = None, **info) -> Path:
    """HF-named MLX weights (LoRA already fused) and their config as a portable folder, atomically."""
    import mlx.core as mx

    dtype = str(next(iter(weights.values())).dtype).split(".")[-1]
    config = {k: v for k, v in config.items() if k != "torch_dtype"} | {"dtype": dtype}

    def write_model(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return _write_folder(path, write_model, tokenizer, source, extra, {"backend": "mlx", **info})
