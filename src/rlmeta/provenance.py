"""Provenance: what produced a result, and which code a step runs.

``environment()`` records where a step ran: the git commit and whether the tree was dirty (with a
hash of the diff), the versions of the stack, Python, the OS, the CPU model and core count, the
GPU and driver where there is one, and the thread settings. ``rlmeta provenance`` writes an
experiment's ``provenance.json``: that record, the training job's own record (saved with the
checkpoint), the seeds, the config hash, the sha256 of every input file and of the base and trained
models, and the wall time of every job (Snakemake's ``benchmark:`` files). ``evaluate`` embeds it
in ``summary.json`` and the reports show it.

``code_fingerprint(step)`` is how Snakemake notices code changes: the step's module and every
``rlmeta`` module it imports (statically, imports inside functions too), each with the sha256 of
its source, as one string that the rules pass as a param. Editing a module re-runs the rules whose
steps import it, and nothing else. The settings and command-line plumbing are left out (a setting
reaches a rule as a param of its own), and so are the reward functions: they enter the ``score``
rule only, for the rewards and task metrics that experiment uses.
"""
from __future__ import annotations

import argparse
import ast
import csv
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from rlmeta.settings import ROOT

SRC = ROOT / "src"
UNTRACKED = ("rlmeta.settings", "rlmeta.cli", "rlmeta.errors", "rlmeta.testing", "rlmeta.__main__",
             "rlmeta.provenance", "rlmeta.status", "rlmeta.locks")
"""Modules no code fingerprint follows: settings reach rules as params; the others do not compute results."""
LEAVES = ("rlmeta.rewards",)
"""Modules counted but not followed: the reward registry (the reward functions are tracked where used)."""
STACK = ("rlmeta", "torch", "transformers", "trl", "peft", "accelerate", "mlx", "mlx-lm", "mlx-metal", "mlx-cpu",
         "numpy", "pyarrow", "pandas", "datasets", "tokenizers", "safetensors", "math-verify", "sympy", "pydantic",
         "snakemake", "snakemake-executor-plugin-slurm", "wandb", "matplotlib", "feedparser", "vllm")
"""Distributions whose versions a provenance record lists (those installed)."""


# -- code fingerprints ---------------------------------------------------------------------------------

def module_path(name: str) -> Path | None:
    """The source file of an ``rlmeta`` module (package ``__init__.py`` or ``name.py``), or of a reward module
    loaded from outside the package (``rlmeta.rewards.load_modules``: its file, so that editing it re-runs the
    jobs that use its rewards), or None."""
    if name.split(".")[0] != "rlmeta":
        from rlmeta.rewards import PLUGINS

        file = PLUGINS.get(name) or getattr(sys.modules.get(name), "__file__", None)
        return Path(file) if file and Path(file).is_file() else None
    base = SRC.joinpath(*name.split("."))
    for p in (base / "__init__.py", base.with_suffix(".py")):
        if p.is_file():
            return p
    return None


IMPORTS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlmeta" / "imports"
"""Where the import names found in a source file are kept, by the file's sha256: parsing every module on each
Snakefile evaluation costs about a second, which every ``snakemake`` call (a dry run too) would pay."""


def _import_names(path: Path) -> list[str]:
    """Every ``rlmeta...`` name that ``path`` imports (module level or inside functions), from a cache keyed
    by the file's content, else by parsing it. Names, not modules: which ones are modules is decided by the
    caller against the files of today (``from rlmeta.a import b`` imports module ``rlmeta.a.b`` if it exists)."""
    cached = IMPORTS_CACHE / f"{_file_hash(path)}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rlmeta")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlmeta") and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    names = sorted(found)
    try:  # written whole (a parallel Snakemake may read it): a temporary file, then a rename
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: parse again next time
    return names


@functools.cache
def _imports(name: str) -> tuple[str, ...]:
    """``rlmeta`` modules that module ``name`` imports anywhere (module level or inside functions)."""
    path = module_path(name)
    if path is None:
        return ()
    return tuple(sorted(m for m in _import_names(path) if module_path(m) is not None))


def module_graph(roots) -> list[str]:
    """Every tracked ``rlmeta`` module reachable from ``roots`` (``UNTRACKED`` skipped unless a root, ``LEAVES``
    not followed)."""
    seen: set[str] = set()
    roots = list(roots)
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or (name.startswith(UNTRACKED) and name not in roots):
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # a module's packages run their __init__
        if name not in LEAVES:
            todo += list(_imports(name))
    return sorted(seen)


@functools.cache
def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_fingerprint(roots) -> str:
    """``module@sha8`` of every module of ``module_graph(roots)``, space-separated (a rule's ``code`` param)."""
    return " ".join(f"{m}@{_file_hash(module_path(m))[:8]}" for m in module_graph(roots))


def step_module(step: str) -> str:
    """The module that implements an ``rlmeta`` step."""
    from rlmeta.cli import STEPS

    return STEPS[step][0]


def reward_modules(names) -> list[str]:
    """The modules that define these registered rewards (scorers)."""
    from rlmeta.rewards import REGISTRY

    return sorted({REGISTRY[n].fn.__module__ for n in names})


# -- environment ---------------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: Path = ROOT) -> dict:
    """Commit, dirty flag and the sha256 of ``git diff HEAD`` (tracked changes) plus the untracked file names."""
    commit = _run(["git", "rev-parse", "HEAD"], root)
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=normal"], root) or ""
    diff = (_run(["git", "diff", "HEAD"], root) or "") + "".join(
        ln for ln in status.splitlines(keepends=True) if ln.startswith("??"))
    dirty = bool(status.strip())
    return {"commit": commit.strip(), "dirty": dirty,
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor() or "unknown").strip()


def _gpu() -> dict | None:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if out:
        gpus = [dict(zip(("name", "driver", "memory"), (x.strip() for x in line.split(","))))
                for line in out.strip().splitlines()]
        return {"count": len(gpus), "devices": gpus}
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return {"count": 1, "devices": [{"name": "Apple Silicon GPU (Metal)", "driver": None, "memory": None}]}
    return None


def packages() -> dict[str, str]:
    """Installed versions of the stack (``STACK``)."""
    out = {}
    for name in STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def threads() -> dict:
    """Thread settings: the environment variables that set them and what torch uses, when torch is loaded."""
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                          "OPENBLAS_NUM_THREADS", "RLMETA_TORCH_THREADS", "CUBLAS_WORKSPACE_CONFIG")}
    record = {"env": env, "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        record.update(torch_intra_op=torch.get_num_threads(), torch_inter_op=torch.get_num_interop_threads(),
                      torch_deterministic=torch.are_deterministic_algorithms_enabled())
    return record


def environment() -> dict:
    """Where and with what this process runs (see the module docstring)."""
    return {"git": git_state(), "packages": packages(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "cpu": {"model": _cpu_model(), "cores": os.cpu_count()}, "gpu": _gpu(), "threads": threads(),
            "hostname": platform.node(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_training_record(folder: str | Path, seed: int, spec: dict) -> None:
    """The training job's environment, seed and spec, next to the model it wrote (``training.json``)."""
    from rlmeta.io import write_json

    write_json(Path(folder) / TRAINING_FILE, {"environment": environment(), "seed": seed, "spec": spec})


TRAINING_FILE = "training.json"


# -- an experiment's provenance.json ------------------------------------------------------------------

def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_info(path: str | Path) -> dict:
    """Path and sha256 of a checkpoint's model.safetensors (of its sorted shards when sharded;
    null when the folder holds none, e.g. a hub id)."""
    p = Path(path)
    single = p / "model.safetensors"
    files = [single] if single.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return {"path": str(path), "sha256": None}
    if len(files) == 1:
        return {"path": str(path), "sha256": file_sha256(files[0])}
    digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()
    return {"path": str(path), "sha256": digest, "shards": [f.name for f in files]}


def config_hash(config_block: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of an experiment's config block."""
    return hashlib.sha256(json.dumps(config_block, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_inputs(paths) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files, or folders walked), keyed by path."""
    out = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                out[str(f)] = file_sha256(f)
    return out


def wall_times(benchmark_files) -> dict[str, dict]:
    """Wall time (s) and peak memory (MB) of every job, from Snakemake's ``benchmark:`` TSV files."""
    out = {}
    for f in map(Path, benchmark_files):
        with open(f) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            parts = f.with_suffix("").parts
            if "benchmarks" in parts[:-1]:  # <rule>/<name> or <rule>/<exp>/seed<N>, below results/benchmarks/
                key = "/".join(parts[len(parts) - parts[::-1].index("benchmarks"):])
            else:
                key = f"{f.parent.name}/{f.stem}"
            if key.count("/") == 1 and key.split("/")[0] == key.split("/")[1]:
                key = f.stem
            out[key] = {"seconds": float(rows[-1]["s"]), "max_rss_mb": _num(rows[-1].get("max_rss"))}
    return out


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def build(experiment: str, config: dict, seed: int, inputs, models: dict[str, str], benchmarks) -> dict:
    """An experiment's provenance record (``provenance.json``); ``training``: the record each trained model
    (every role but ``base``: ``trained``, or ``seed<N>`` per training run) carries, by role."""
    training = {role: json.loads((Path(path) / TRAINING_FILE).read_text()) for role, path in models.items()
                if role != "base" and (Path(path) / TRAINING_FILE).is_file()}
    return {"experiment": experiment, "seed": seed, "config_hash": config_hash(config),
            "environment": environment(), "training": training,
            "models": {k: checkpoint_info(v) for k, v in models.items()},
            "inputs": hash_inputs(inputs), "jobs": wall_times(benchmarks)}


def command(p: argparse.ArgumentParser):
    """``rlmeta provenance``: write an experiment's provenance.json."""
    from rlmeta.cli import settings_type
    from rlmeta.settings import Experiment

    p.add_argument("--experiment", required=True)
    p.add_argument("--config", required=True, type=settings_type(Experiment, "config"),
                   help="the experiment's config block (JSON or a file)")
    p.add_argument("--seed", type=int, required=True, help="the global seed")
    p.add_argument("--inputs", nargs="*", default=[], help="data files and folders to hash")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=PATH",
                   help="a model folder (or hub id) with its role, e.g. base=results/warmstart/x (repeatable)")
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark files of the jobs")
    p.add_argument("--out", required=True, help="provenance.json to write")

    def run(a):
        from rlmeta.io import write_json

        models = dict(m.split("=", 1) for m in a.model)
        write_json(a.out, build(a.experiment, a.config.model_dump(mode="json"), a.seed, a.inputs, models,
                                a.benchmarks))
    return run


def rule_times(benchmarks: str | Path) -> list[dict]:
    """Per rule, from every benchmark file under ``benchmarks`` (``results/benchmarks/<rule>/...tsv``): jobs,
    total and longest wall time, and the peak memory of its jobs; longest total first."""
    root = Path(benchmarks)
    per: dict[str, dict] = {}
    for key, t in wall_times(sorted(root.rglob("*.tsv"))).items():
        rule = key.split("/")[0]
        r = per.setdefault(rule, {"rule": rule, "jobs": 0, "seconds": 0.0, "longest": 0.0, "longest_job": "",
                                  "max_rss_mb": None})
        r["jobs"] += 1
        r["seconds"] += t["seconds"]
        if t["seconds"] >= r["longest"]:
            r["longest"], r["longest_job"] = t["seconds"], key
        if t["max_rss_mb"] is not None:
            r["max_rss_mb"] = max(r["max_rss_mb"] or 0.0, t["max_rss_mb"])
    return sorted(per.values(), key=lambda r: -r["seconds"])


def times_command(p: argparse.ArgumentParser):
    """``rlmeta times``: where a run's time went, per rule (the end of ``make run`` prints it)."""
    p.add_argument("--results", default="results", help="the results folder (its benchmarks/ is read)")

    def run(a):
        from rlmeta.errors import UserError

        rows = rule_times(Path(a.results) / "benchmarks")
        if not rows:
            raise UserError(f"{a.results}/benchmarks has no benchmark files: run the workflow first")
        total = sum(r["seconds"] for r in rows)
        print(f"{'rule':<22} {'jobs':>4} {'seconds':>9} {'share':>6}  longest job")
        for r in rows:
            print(f"{r['rule']:<22} {r['jobs']:>4} {r['seconds']:>9.1f} {r['seconds'] / total:>6.1%}  "
                  f"{r['longest_job']} ({r['longest']:.1f} s)")
        print(f"{'all jobs':<22} {sum(r['jobs'] for r in rows):>4} {total:>9.1f}  (job seconds; jobs run side by "
              "side, so the wall time is shorter)")
    return run
