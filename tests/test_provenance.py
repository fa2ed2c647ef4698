"""Reproducibility: the lock is what is installed, provenance records have every field, and a code
change re-runs exactly the jobs that run that code (``rlmeta.provenance``, ``rlmeta status``)."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from rlmeta import provenance
from rlmeta.cli import main
from rlmeta.settings import ROOT
from rlmeta.testing.workflow import (
    common_args,
    default_seeds,
    dry_run,
    job_keys,
    mark_done,
    mirror_workflow,
    snakemake_env,
)

LOCK = ROOT / "requirements.lock"


# -- the lock ------------------------------------------------------------------------------------------

def locked() -> dict[str, str]:
    """Package -> version of the lock's lines whose markers hold here, plus the torch pin of its header."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.startswith("# pin: "):
            name, version = line.removeprefix("# pin: ").split("==")
            pins[canonicalize_name(name)] = version
        elif line and not line.startswith("#"):
            req, _, marker = line.partition(" ; ")
            if not marker or Marker(marker).evaluate():
                name, version = req.split("==")
                pins[canonicalize_name(name)] = version
    return pins


def test_the_environment_has_exactly_the_locked_versions():
    """`make setup` installs from requirements.lock: every locked package is installed at its pin."""
    pins = locked()
    assert {"torch", "transformers", "trl", "peft", "snakemake", "mlx-lm", "pyarrow"} <= set(pins)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v.split("+")[0]
             and installed.get(n, "").split("+")[0] != v}
    assert wrong == {}, "locked version, installed version (run `make setup`)"


def test_conda_environments_pin_what_the_lock_pins():
    lock_lines = {line.split(" ; ")[0] for line in LOCK.read_text().splitlines() if line and line[0] != "#"}
    for env in ("core", "torch", "mlx"):
        pins = re.findall(r'^\s+- "([^"]+)"$', (ROOT / "envs" / f"{env}.yaml").read_text(), re.M)
        assert pins, env
        for pin in pins:
            req = pin.split(" ; ")[0]
            assert req in lock_lines or req == "torch==2.13.0", f"envs/{env}.yaml: {pin} is not in the lock"
    # vllm's: torch's pins but torch's own (vLLM brings the build it was compiled for), plus vllm
    torch_pins = re.findall(r'^\s+- "([^"]+)"$', (ROOT / "envs" / "torch.yaml").read_text(), re.M)
    vllm_pins = re.findall(r'^\s+- "([^"]+)"$', (ROOT / "envs" / "vllm.yaml").read_text(), re.M)
    assert vllm_pins == ["vllm>=0.11 ; sys_platform == 'linux'"] + [p for p in torch_pins if p != "torch==2.13.0"]


# -- code fingerprints ---------------------------------------------------------------------------------

def graph(step: str) -> list[str]:
    return provenance.module_graph([provenance.step_module(step)])


def test_each_trainer_is_in_its_own_steps_graph_only():
    assert "rlmeta.rl.trl_trainer" in graph("train-trl") and "rlmeta.rl.trl_trainer" not in graph("train-mlx")
    assert "rlmeta.rl.mlx_trainer" in graph("train-mlx") and "rlmeta.rl.mlx_trainer" not in graph("train-trl")
    assert "rlmeta.meta.fomaml" in graph("train-fomaml") and "rlmeta.meta.fomaml" not in graph("train-trl")
    # settings reach rules as params, the registry is a leaf: reward functions are added where used
    assert not any(m.startswith(("rlmeta.settings", "rlmeta.cli")) for m in graph("train-trl"))
    assert "rlmeta.rewards" in graph("score") and "rlmeta.rewards.xml" not in graph("score")
    assert provenance.reward_modules(["gsm8k_correct", "sections", "math_correct"]) == [
        "rlmeta.rewards.mathverify", "rlmeta.rewards.text", "rlmeta.rewards.xml"]


def test_fingerprint_names_every_module_with_its_source_hash():
    fp = provenance.code_fingerprint(["rlmeta.scoring"])
    entries = dict(e.split("@") for e in fp.split())
    assert set(entries) == set(provenance.module_graph(["rlmeta.scoring"]))
    path = provenance.module_path("rlmeta.scoring")
    assert entries["rlmeta.scoring"] == hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_import_lists_come_from_a_cache_keyed_by_content(tmp_path, monkeypatch):
    """A module's import names are parsed once per content: a second read is the cached list, a damaged
    cache entry is parsed again, and an edit (new content, new key) is never served an old list."""
    monkeypatch.setattr(provenance, "IMPORTS_CACHE", tmp_path / "cache")
    src = tmp_path / "mod.py"
    src.write_text("import rlmeta.rollout\ndef f():\n    from rlmeta.rewards import REGISTRY\n")
    names = ["rlmeta.rewards", "rlmeta.rewards.REGISTRY", "rlmeta.rollout"]
    assert provenance._import_names(src) == names
    (entry,) = (tmp_path / "cache").iterdir()
    assert json.loads(entry.read_text()) == names
    entry.write_text("not json")
    assert provenance._import_names(src) == names and json.loads(entry.read_text()) == names
    provenance._file_hash.cache_clear()
    src.write_text("import rlmeta.scoring\n")
    assert provenance._import_names(src) == ["rlmeta.scoring"]
    assert len(list((tmp_path / "cache").iterdir())) == 2


# -- provenance records --------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def test_git_state_flags_a_dirty_tree_with_a_hash_of_the_diff(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.org")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-qm", "one")
    clean = provenance.git_state(tmp_path)
    assert clean == {"commit": git(tmp_path, "rev-parse", "HEAD").strip(), "dirty": False, "diff_sha256": None}
    (tmp_path / "a.py").write_text("x = 2\n")
    one = provenance.git_state(tmp_path)
    (tmp_path / "a.py").write_text("x = 3\n")
    two = provenance.git_state(tmp_path)
    assert one["dirty"] and two["dirty"] and one["commit"] == clean["commit"]
    assert re.fullmatch(r"[0-9a-f]{64}", one["diff_sha256"]) and one["diff_sha256"] != two["diff_sha256"]
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "new.py").write_text("")  # an untracked file dirties the tree too
    assert provenance.git_state(tmp_path)["dirty"] is True


def test_outside_a_git_checkout_the_commit_is_null(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None, "diff_sha256": None}


@pytest.fixture
def record(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"rows")
    (data / "feeds").mkdir()
    (data / "feeds" / "a.rss").write_bytes(b"<rss/>")
    base, trained = tmp_path / "base", tmp_path / "trained"
    for folder, payload in ((base, b"base weights"), (trained, b"trained weights")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(payload)
    provenance.write_training_record(trained, seed=7, spec={"algorithm": "gspo"})
    bench = tmp_path / "benchmarks" / "train_trl" / "exp.tsv"
    bench.parent.mkdir(parents=True)
    with open(bench, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["s", "h:m:s", "max_rss", "max_vms"])
        w.writerow(["12.5", "0:00:12", "812.3", "900"])
    rec = provenance.build("exp", {"dataset": "gsm8k"}, 1234, [data / "train.parquet", data / "feeds"],
                           {"base": str(base), "trained": str(trained)}, [bench])
    return json.loads(json.dumps(rec)), tmp_path


def test_provenance_record_has_every_field(record):
    rec, tmp = record
    env = rec["environment"]
    assert set(env) >= {"git", "packages", "python", "os", "machine", "cpu", "gpu", "threads", "hostname", "time_utc"}
    assert set(env["git"]) == {"commit", "dirty", "diff_sha256"}
    assert re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])  # this checkout
    dirty = bool(git(ROOT, "status", "--porcelain").strip())
    assert env["git"]["dirty"] is dirty and (env["git"]["diff_sha256"] is not None) is dirty
    for pkg in ("torch", "transformers", "trl", "peft", "numpy", "pyarrow", "snakemake", "rlmeta"):
        assert env["packages"][pkg] == metadata.version(pkg)
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cpu"]["model"] and env["cpu"]["cores"] >= 1
    assert env["gpu"] is None  # no GPU here; {count, devices: [{name, driver, memory}]} where there is
    assert {"OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG"} <= set(env["threads"]["env"])
    assert rec["seed"] == 1234 and rec["experiment"] == "exp"
    assert rec["config_hash"] == provenance.config_hash({"dataset": "gsm8k"})
    assert rec["inputs"] == {str(tmp / "data" / "train.parquet"): hashlib.sha256(b"rows").hexdigest(),
                             str(tmp / "data" / "feeds" / "a.rss"): hashlib.sha256(b"<rss/>").hexdigest()}
    assert rec["models"]["base"]["sha256"] == hashlib.sha256(b"base weights").hexdigest()
    assert rec["models"]["trained"]["sha256"] == hashlib.sha256(b"trained weights").hexdigest()
    assert rec["jobs"] == {"train_trl/exp": {"seconds": 12.5, "max_rss_mb": 812.3}}
    # the training job's own record (where and with which seed it trained) travels with the checkpoint
    assert set(rec["training"]) == {"trained"}
    assert rec["training"]["trained"]["seed"] == 7 and rec["training"]["trained"]["spec"] == {"algorithm": "gspo"}
    assert rec["training"]["trained"]["environment"]["git"] == env["git"]


def test_benchmark_keys_name_the_rule_and_the_run(tmp_path):
    bench = tmp_path / "results" / "benchmarks"
    for rel in ("train_trl/gsm8k_gspo/seed7.tsv", "build_model/tiny.tsv", "summary.tsv"):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t10\n")
    keys = provenance.wall_times(sorted(bench.rglob("*.tsv")))
    assert set(keys) == {"train_trl/gsm8k_gspo/seed7", "build_model/tiny", "summary"}


def test_times_per_rule(tmp_path, capsys):
    bench = tmp_path / "results" / "benchmarks"
    for rel, sec in (("train_trl/a/seed1.tsv", 30.0), ("train_trl/a/seed2.tsv", 50.0), ("score/a/base.tsv", 5.0)):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text(f"s\th:m:s\tmax_rss\n{sec}\t0:00:01\t10\n")
    rows = provenance.rule_times(bench)
    assert [(r["rule"], r["jobs"], r["seconds"], r["longest_job"]) for r in rows] == [
        ("train_trl", 2, 80.0, "train_trl/a/seed2"), ("score", 1, 5.0, "score/a/base")]
    assert main(["times", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "train_trl                 2      80.0  94.1%  train_trl/a/seed2 (50.0 s)" in out
    assert main(["times", "--results", str(tmp_path / "none")]) == 2


def test_a_hub_model_has_no_hash(tmp_path):
    assert provenance.checkpoint_info("Qwen/Qwen3-0.6B") == {"path": "Qwen/Qwen3-0.6B", "sha256": None}


# -- code-aware re-runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_copy(tmp_path_factory):
    """The default workflow marked done in a work directory whose ``src`` is a copy (to be edited)."""
    base = tmp_path_factory.mktemp("code_reruns")
    workdir = mirror_workflow(base / "wf", copy=("src",))
    results = base / "results"
    mark_done(workdir, results)
    return workdir, results


class edited:
    """Append a comment to a module of the copied src for the duration of a ``with`` block."""

    def __init__(self, workdir: Path, module: str):
        self.path = workdir / "src" / Path(*module.split(".")).with_suffix(".py")

    def __enter__(self):
        self.text = self.path.read_text()
        self.path.write_text(self.text + "\n# edited by a test\n")

    def __exit__(self, *exc):
        self.path.write_text(self.text)


def trainings(rule: str, exp: str) -> set[tuple[str, str]]:
    return {(rule, f"exp={exp}, seed={s}") for s in default_seeds(exp)}


def downstream_of_training(exp: str) -> set[tuple[str, str]]:
    """A re-trained experiment's jobs after training: new responses, their scores, provenance, evaluation."""
    e = f"exp={exp}"
    return {(rule, f"{e}, policy=seed{s}") for s in default_seeds(exp) for rule in ("generate", "score")} | {
        ("provenance", e), ("evaluate", e), ("report", e)}


SUMMARY = {("summary", ""), ("all", "")}


@pytest.mark.slow
def test_the_copy_is_up_to_date_until_a_module_is_edited(done_copy):
    workdir, results = done_copy
    _, planned = dry_run(workdir, results)
    assert planned == []


@pytest.mark.slow
def test_editing_a_reward_module_reruns_the_experiments_that_use_it(done_copy):
    """rewards/xml.py holds the GSM8K rewards and metrics: both GSM8K experiments are re-scored and, as they
    train on those rewards, re-trained; the headline and MATH experiments are untouched."""
    workdir, results = done_copy
    with edited(workdir, "rlmeta.rewards.xml"):
        _, planned = dry_run(workdir, results)
    expected = set(SUMMARY)
    for exp in ("gsm8k_grpo_lora", "gsm8k_gspo"):
        expected |= {("score", f"exp={exp}, policy=base")} | trainings("train_trl", exp) | downstream_of_training(exp)
    assert job_keys(planned) == expected


@pytest.mark.slow
def test_editing_a_metric_only_module_reruns_only_evaluation(done_copy):
    """rewards/mathverify.py is the MATH answer check: FOMAML does not train on it, its adaptation
    evaluation uses it, so only that evaluation and its report re-run."""
    workdir, results = done_copy
    with edited(workdir, "rlmeta.rewards.mathverify"):
        _, planned = dry_run(workdir, results)
    assert job_keys(planned) == {("eval_adaptation", "exp=math_fomaml"), ("report_fomaml", "exp=math_fomaml")} | SUMMARY


@pytest.mark.slow
@pytest.mark.parametrize("module,rule,exps", [
    ("rlmeta.rl.trl_trainer", "train_trl", ("gsm8k_grpo_lora", "gsm8k_gspo", "syllogism_grpo_trl")),
    ("rlmeta.rl.mlx_trainer", "train_mlx", ("headlines_gspo", "headlines_grpo_ued", "syllogism_grpo_mlx")),
])
def test_editing_a_trainer_reruns_its_experiments_only(done_copy, module, rule, exps):
    workdir, results = done_copy
    with edited(workdir, module):
        _, planned = dry_run(workdir, results)
    expected = set(SUMMARY)
    for exp in exps:
        expected |= trainings(rule, exp) | downstream_of_training(exp)
    assert job_keys(planned) == expected


@pytest.mark.slow
def test_status_says_which_module_changed(done_copy):
    workdir, results = done_copy
    with edited(workdir, "rlmeta.rl.trl_trainer"):
        out = subprocess.run([sys.executable, "-m", "rlmeta", "status", *common_args(results)], cwd=workdir,
                             capture_output=True, text=True, timeout=300, env=snakemake_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "train_trl (exp=gsm8k_gspo, seed=1234): code changed: rlmeta.rl.trl_trainer" in lines
    assert "generate (exp=gsm8k_gspo, policy=seed1234): inputs remade upstream" in lines
    assert lines[-1] == "26 job(s) would run"  # 5 trainings (3 seeds + 2), 10 generate/score, 9 after them, 2
