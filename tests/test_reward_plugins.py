"""Rewards users plug in (config ``reward_modules``, ``--reward-modules``): the loader's one-line errors, the
plugin scoring a responses table and checked like a built-in reward, training on it in the step's own process,
and a code-aware re-run of exactly the jobs that use it when its file is edited."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rlmeta import rewards as rewards_pkg
from rlmeta.cli import REWARD_MODULES_ENV, main
from rlmeta.io import write_records, write_table
from rlmeta.rewards import PLUGINS, REGISTRY, RewardModuleError, load_modules
from rlmeta.settings import ROOT, ConfigError, validate
from rlmeta.status import changed_modules
from rlmeta.tables import PROMPTS, RESPONSES
from rlmeta.testing.fixtures import prompt_rows, response_rows
from rlmeta.testing.workflow import common_args, dry_run, job_keys, mark_done, mirror_workflow, snakemake

PLUGIN = "tests/data/plugin_reward.py"
PLUGIN_MODULE = "rlmeta_reward_plugin_tests_data_plugin_reward"


def char_share(text: str, chars: str = "0123456789") -> float:
    """The plugin's reward computed here independently (share of non-space characters in ``chars``)."""
    kept = [c for c in text if not c.isspace()]
    return sum(c in chars for c in kept) / len(kept) if kept else 0.0


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Every test starts and ends with the built-in registry only and no reward modules in the environment
    (the steps export what they load; other tests in this process must not see it)."""
    monkeypatch.setenv(REWARD_MODULES_ENV, "")
    monkeypatch.chdir(ROOT)
    before, plugins = dict(REGISTRY), dict(PLUGINS)
    yield
    for name in set(PLUGINS) - set(plugins):
        sys.modules.pop(name, None)
    REGISTRY.clear()
    REGISTRY.update(before)
    PLUGINS.clear()
    PLUGINS.update(plugins)


# -- the loader ------------------------------------------------------------------------------------------

def load_error(tmp_path: Path, spec: str, source: str | None = None) -> str:
    if source is not None:
        (tmp_path / spec).write_text(source)
    before = set(REGISTRY)
    with pytest.raises(RewardModuleError) as e:
        load_modules([spec], tmp_path)
    assert set(REGISTRY) == before  # a failed module leaves nothing registered
    assert not any(m.startswith("rlmeta_reward_plugin_") and m.endswith(Path(spec).stem) for m in sys.modules)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_loader_errors_are_one_line(tmp_path):
    assert load_error(tmp_path, "nope.py") == (f"reward module nope.py: no such file ({tmp_path / 'nope.py'}; paths "
                                               "are relative to the workflow folder)")
    assert load_error(tmp_path, "syntax.py", "from rlmeta.rewards import register\ndef f(:\n") == (
        "reward module syntax.py: SyntaxError: invalid syntax (line 2)")
    assert load_error(tmp_path, "imports.py", "import no_such_package_xyz\n") == (
        "reward module imports.py: ModuleNotFoundError: No module named 'no_such_package_xyz'")
    # a second reward of the same name (here a built-in one), after a first reward that must be undone too
    dup = ("from rlmeta.rewards import register\n"
           "@register('fine_one', 'ok')\ndef a(c, r=None, p=None): return 0.0\n"
           "@register('length', 'clash')\ndef b(c, r=None, p=None): return 0.0\n")
    assert load_error(tmp_path, "dup.py", dup) == (
        f"reward module dup.py: reward 'length' is registered twice (rlmeta.rewards.text and {tmp_path / 'dup.py'})")
    kwargs = "from rlmeta.rewards import register\n@register('kw', 'x')\ndef f(c, r=None, p=None, **kw): return 0.0\n"
    assert load_error(tmp_path, "kwargs.py", kwargs) == (
        "reward module kwargs.py: TypeError: reward kw: parameter 'kw' must be a keyword with a default (no "
        "**kwargs: unknown parameters must be errors)")
    assert load_error(tmp_path, "no_such_reward_module") == (
        "reward module 'no_such_reward_module': no such file, importable module or entry point of the group "
        "rlmeta.rewards")


def test_two_files_registering_one_name_is_an_error(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "plugin_reward.py").write_text((ROOT / PLUGIN).read_text())
    load_modules([str(ROOT / PLUGIN)], ROOT)
    with pytest.raises(RewardModuleError) as e:
        load_modules(["other/plugin_reward.py"], tmp_path)
    assert str(e.value) == (f"reward module other/plugin_reward.py: reward 'char_share' is registered twice "
                            f"({ROOT / PLUGIN} and {tmp_path / 'other' / 'plugin_reward.py'})")


def test_a_module_loads_once_under_a_stable_name():
    assert load_modules([PLUGIN, PLUGIN]) == [PLUGIN_MODULE, PLUGIN_MODULE]
    assert load_modules([str(ROOT / PLUGIN)], ROOT) == [PLUGIN_MODULE]  # the same file, given absolute
    spec = REGISTRY["char_share"]
    assert spec.fn.__module__ == PLUGIN_MODULE and list(spec.params) == ["chars"]
    assert spec.score(["abcd", "a b 1 2", "", "xyz"], params={"chars": "abc"}).tolist() == [0.75, 0.5, 0.0, 0.0]
    # an importable module by name (here one already imported: nothing is registered twice)
    assert load_modules(["rlmeta.rewards.text"]) == ["rlmeta.rewards.text"]


def test_an_installed_entry_point_is_loaded_by_name(tmp_path, monkeypatch):
    """A spec that is an entry point of the group rlmeta.rewards imports the module it points to."""
    (tmp_path / "my_rewards_pkg.py").write_text((ROOT / PLUGIN).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = rewards_pkg.metadata.EntryPoint("mine", "my_rewards_pkg", rewards_pkg.ENTRY_POINT_GROUP)
    monkeypatch.setattr(rewards_pkg.metadata, "entry_points",
                        lambda group: [ep] if group == rewards_pkg.ENTRY_POINT_GROUP else [])
    try:
        assert load_modules(["mine"]) == ["my_rewards_pkg"]
        assert REGISTRY["char_share"].fn.__module__ == "my_rewards_pkg"
        assert PLUGINS["my_rewards_pkg"] == tmp_path / "my_rewards_pkg.py"
    finally:
        sys.modules.pop("my_rewards_pkg", None)


# -- config validation at start-up ------------------------------------------------------------------------

def default_with(exp_update: dict, modules: list[str] | None = None) -> dict:
    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    raw["check_hub"] = False
    if modules is not None:
        raw["reward_modules"] = modules
    raw["experiments"]["headlines_gspo"].update(exp_update)
    return raw


PLUGGED = {"rewards": {"sections": 0.5, "char_share": 0.5}, "reward_params": {"char_share": {"chars": "ab"}}}


def test_experiments_naming_a_plugin_reward_validate_after_its_module_loads():
    cfg = validate(default_with(PLUGGED, [PLUGIN]), ROOT)
    assert cfg.reward_modules == [PLUGIN]
    assert cfg.experiments["headlines_gspo"].reward_weights == {"sections": 0.5, "char_share": 0.5}
    assert REGISTRY["char_share"].fn.__module__ == PLUGIN_MODULE


@pytest.mark.parametrize("modules,params,expected", [
    ([PLUGIN], {"chars": 3}, "config error: 'experiments.headlines_gspo': reward_params.char_share.chars is 3 (int); "
                             "reward 'char_share' expects str like its default '0123456789'"),
    ([PLUGIN], {"charz": "ab"}, "config error: 'experiments.headlines_gspo': reward_params.char_share.charz: reward "
                                "'char_share' has no parameter 'charz'; its parameters: chars (default '0123456789')"),
    (None, {"chars": "ab"}, "config error: 'experiments.headlines_gspo': unknown reward 'char_share'"),
    (["tests/data/missing.py"], {}, "config error: 'reward_modules': reward module tests/data/missing.py: no such "
                                    f"file ({ROOT / 'tests/data/missing.py'}; paths are relative to the workflow "
                                    "folder)"),
])
def test_a_bad_plugin_param_or_module_is_one_line_at_start_up(modules, params, expected):
    with pytest.raises(ConfigError) as e:
        validate(default_with({**PLUGGED, "reward_params": {"char_share": params}}, modules), ROOT)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(expected), msg


def test_rlmeta_validate_reports_a_bad_plugin_param_in_one_line(tmp_path, capsys):
    cfg = default_with({**PLUGGED, "reward_params": {"char_share": {"chars": 3}}}, [PLUGIN])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "rlmeta validate: error: config error: 'experiments.headlines_gspo': reward_params.char_share.chars is 3")


# -- the score step ----------------------------------------------------------------------------------------

COMPLETIONS = ["abcd", "a b 1 2", "", "xyz 42"]


@pytest.fixture
def responses(tmp_path):
    prompts = prompt_rows("plug", "xml_cot", [("What is 2+2?", "4"), ("What is 3+3?", "6")])
    write_records(tmp_path / "prompts.parquet", prompts, PROMPTS)
    comps = {("p000", 0): COMPLETIONS[0], ("p000", 1): COMPLETIONS[1], ("p001", 0): COMPLETIONS[2],
             ("p001", 1): COMPLETIONS[3]}
    write_table(tmp_path / "responses.parquet", pa.Table.from_pylist(response_rows("base", comps), schema=RESPONSES),
                RESPONSES)
    return tmp_path


def score_args(d: Path, mix: dict) -> list[str]:
    return ["score", "--prompts", str(d / "prompts.parquet"), "--responses", str(d / "responses.parquet"),
            "--out", str(d / "rewards.parquet"), "--template", "xml_cot", "--rewards", json.dumps(mix)]


def test_score_step_gives_the_plugin_values(responses):
    mix = {"rewards": {"char_share": 2.0}, "reward_params": {"char_share": {"chars": "abc"}}}
    assert main(score_args(responses, mix) + ["--reward-modules", PLUGIN]) == 0
    t = pq.read_table(responses / "rewards.parquet").to_pydict()
    # by hand: abcd -> 3/4; "a b 1 2" -> a, b of a b 1 2 -> 2/4; "" -> 0; "xyz42" -> none of abc -> 0
    assert t["char_share"] == [0.75, 0.5, 0.0, 0.0]
    assert t["reward"] == [1.5, 1.0, 0.0, 0.0]
    assert t["accuracy/gsm8k_strict"] == [0.0, 0.0, 0.0, 0.0]  # the template's task metrics as ever
    # the step exports what it loaded, for the processes it starts (torchrun, workers)
    assert os.environ[REWARD_MODULES_ENV] == str(ROOT / PLUGIN)


def test_score_step_reads_the_modules_from_the_environment(responses, monkeypatch):
    monkeypatch.setenv(REWARD_MODULES_ENV, str(ROOT / PLUGIN))  # as the workflow's shell prefix sets it
    assert main(score_args(responses, {"rewards": {"char_share": 1.0}})) == 0
    assert pq.read_table(responses / "rewards.parquet").column("char_share").to_pylist() == [
        char_share(c) for c in COMPLETIONS] == [0.0, 0.5, 0.0, 0.4]


def test_score_step_without_the_module_or_with_a_bad_param_fails_in_one_line(responses, capsys):
    with pytest.raises(SystemExit) as e:
        main(score_args(responses, {"rewards": {"char_share": 1.0}}))
    assert e.value.code == 2 and "unknown reward 'char_share'" in capsys.readouterr().err.splitlines()[-1]
    mix = {"rewards": {"char_share": 1.0}, "reward_params": {"char_share": {"chars": ["a"]}}}
    with pytest.raises(SystemExit) as e:
        main(score_args(responses, mix) + ["--reward-modules", PLUGIN])
    last = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and last == (
        "rlmeta score: error: argument --rewards: rewards error: reward_params.char_share.chars is ['a'] (list); "
        "reward 'char_share' expects str like its default '0123456789'")
    assert main(score_args(responses, {"rewards": {"char_share": 1.0}}) + ["--reward-modules", "nope.py"]) == 2
    assert capsys.readouterr().err == (f"rlmeta score: error: reward module nope.py: no such file ({ROOT / 'nope.py'}; "
                                       "paths are relative to the workflow folder)\n")


@pytest.mark.parametrize("step", ["score", "train-mlx", "train-trl", "evaluate", "eval-adaptation", "inspect",
                                  "provenance", "report"])
def test_every_step_documents_the_option(step, capsys):
    with pytest.raises(SystemExit) as e:
        main([step, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--reward-modules FILE_OR_MODULE" in out
    assert f"(default: ${REWARD_MODULES_ENV}, {os.pathsep}-separated, which the workflow sets)" in out
    assert f"entry points of the group {rewards_pkg.ENTRY_POINT_GROUP}" in out


# -- the trainers --------------------------------------------------------------------------------------------

def test_trl_reward_functions_score_with_the_plugin():
    """The TRL trainer's reward functions (what GRPOTrainer calls) go through the registry: the plugin's scores."""
    from rlmeta.rl.trl_trainer import reward_functions
    from rlmeta.settings import RLJob

    load_modules([PLUGIN])
    job = RLJob.model_validate({"rewards": {"char_share": 1.0}, "reward_params": {"char_share": {"chars": "ab"}}})
    (fn,) = reward_functions(job)
    comps = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert fn.__name__ == "char_share"
    assert fn(prompts=[None] * 4, completions=comps) == [char_share(c, "ab") for c in COMPLETIONS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model of tests/test_training_evidence.py and a prompts table of 4 train prompts."""
    from rlmeta.models.build import build_tiny_model
    from rlmeta.settings import ModelBuild

    tmp = tmp_path_factory.mktemp("plugin-train")
    build = ModelBuild(tokenizer="bpe", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64)
    model = build_tiny_model(tmp / "tiny", build, [ROOT / "resources/gsm8k/train.jsonl"], 0)
    rows = [{"prompt_id": f"p{i}", "experiment": "toy", "item_id": f"i{i}", "task": "toy",
             "split": "train" if i < 4 else "eval", "prompt": [{"role": "user", "content": f"count {i} {i + 1}"}],
             "reference": None, "reference_completion": None} for i in range(6)]
    write_records(tmp / "prompts.parquet", rows, PROMPTS)
    return model, tmp / "prompts.parquet"


CHARS = "0123456789abcdef"


@pytest.mark.slow
@pytest.mark.parametrize("step", ["train-mlx", "train-trl"])
def test_each_trainer_trains_on_the_plugin_reward_in_its_own_process(step, tiny, tmp_path):
    """`rlmeta train-mlx|train-trl ... --reward-modules tests/data/plugin_reward.py` in its own process (no
    $RLMETA_REWARD_MODULES): 2 steps on the plugin reward alone; every training completion was scored by the
    plugin with the configured parameter, and each step's reward is their mean."""
    if step == "train-mlx":
        pytest.importorskip("mlx.core")
    from rlmeta.rl.evidence import read_rollouts

    model, prompts = tiny
    job = {"algorithm": "grpo", "backend": "mlx" if step == "train-mlx" else "torch", "rewards": {"char_share": 1.0},
           "reward_params": {"char_share": {"chars": CHARS}},
           "train": {"steps": 2, "batch_prompts": 2, "group_size": 4, "learning_rate": 1e-2, "max_new_tokens": 6,
                     "checkpoint_every": 2, "updates_per_batch": 1, "eval_every": None}}
    env = {k: v for k, v in os.environ.items() if k != REWARD_MODULES_ENV}
    out = subprocess.run(
        [sys.executable, "-m", "rlmeta", step, "--model", str(model), "--prompts", str(prompts),
         "--job", json.dumps(job), "--out", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.parquet"),
         "--rollouts", str(tmp_path / "rollouts"), "--seed", "3", "--wandb", '{"mode": "disabled"}',
         "--reward-modules", PLUGIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    rollouts = read_rollouts(tmp_path / "rollouts").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2] and len(rollouts) == 2 * 2 * 4
    for r in rollouts:  # (TRL keeps rewards in float32)
        assert r["reward/char_share"] == pytest.approx(char_share(r["completion"], CHARS), rel=1e-6, abs=1e-7)
        assert r["reward"] == pytest.approx(r["reward/char_share"])
    for m in metrics:  # a rollout's step counts the updates before it was sampled; a metrics row's, those after
        scores = [r["reward/char_share"] for r in rollouts if r["step"] == m["step"] - 1]
        assert len(scores) == 8
        assert m["reward/char_share"] == pytest.approx(m["reward_mean"]) == pytest.approx(np.mean(scores), rel=1e-6)


# -- code-aware re-runs ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_editing_a_plugin_file_reruns_exactly_the_jobs_of_the_experiment_using_it(tmp_path):
    """Two headline experiments, one of them training on the plugin reward: editing the plugin file re-scores and
    re-trains that one (and what follows), nothing of the other; and a score job run by Snakemake scores with it."""
    workdir = mirror_workflow(tmp_path / "wf")
    (workdir / "plugins").mkdir()
    plugin = workdir / "plugins" / "plugin_reward.py"
    plugin.write_text((ROOT / PLUGIN).read_text())
    override = tmp_path / "plugin.yaml"
    override.write_text(yaml.safe_dump({
        "reward_modules": ["plugins/plugin_reward.py"], "check_hub": False,
        "run_experiments": ["headlines_gspo", "headlines_grpo_ued"],
        "experiments": {"headlines_gspo": {"rewards": {"sections": 0.5, "char_share": 0.5},
                                           "reward_params": {"char_share": {"chars": "ab"}}}}}))
    results = tmp_path / "results"
    mark_done(workdir, results, [override])
    _, planned = dry_run(workdir, results, [override])
    assert planned == []
    plugin.write_text(plugin.read_text() + "\n# edited by a test\n")
    _, planned = dry_run(workdir, results, [override])
    e = "exp=headlines_gspo"
    assert job_keys(planned) == {
        ("score", f"{e}, policy=base"), ("score", f"{e}, policy=seed1234"), ("train_mlx", f"{e}, seed=1234"),
        ("generate", f"{e}, policy=seed1234"), ("provenance", e), ("evaluate", e), ("report", e),
        ("summary", ""), ("all", "")}
    for job in planned:  # `rlmeta status` names the edited file's module as the changed code
        if job["rule"] == "train_mlx" or job_keys([job]) == {("score", f"{e}, policy=base")}:
            assert changed_modules(job["reason"]) == ["rlmeta_reward_plugin_plugins_plugin_reward"], job
    # and a real score job: the step loads the plugin in its own process from the variable the rules export
    exp = results / "headlines_gspo"
    prompts = prompt_rows("headlines_gspo", "inner_scientist", [("A headline", None), ("Another one", None)])
    write_records(exp / "prompts.parquet", prompts, PROMPTS)
    comps = {("p000", 0): "abcd", ("p000", 1): "a b 1 2", ("p001", 0): "", ("p001", 1): "xyz 42"}
    write_table(exp / "responses" / "base.parquet",
                pa.Table.from_pylist(response_rows("base", comps), schema=RESPONSES), RESPONSES)
    out = snakemake(["--cores", "1", "--forcerun", "score", "--allowed-rules", "score",
                     *common_args(results, [override]), "--", exp / "rewards" / "base.parquet"], cwd=workdir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert pq.read_table(exp / "rewards" / "base.parquet").column("char_share").to_pylist() == [0.5, 0.5, 0.0, 0.0]
