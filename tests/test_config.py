"""The settings layer: every config and profile validates; every mistake is one line naming the key,
the value and what is allowed; the generated schema is current; defaults live only in rlmeta.settings."""
from __future__ import annotations

import copy
import inspect

import pytest
import yaml

from rlmeta import settings as S
from rlmeta.errors import UserError
from rlmeta.settings import ROOT, ConfigError, load_config, startup_checks, validate

DEFAULT = ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(DEFAULT.read_text())


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    return msg


def _with(raw, path: str, value):
    """A copy of the raw config with the dotted ``path`` set to ``value``."""
    cfg = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


def test_default_validates_and_fills_defaults():
    cfg = load_config(DEFAULT)
    exp = cfg.experiments["gsm8k_grpo_lora"]
    assert exp.train.beta == 0.0 and exp.train.ued.enabled is False  # defaults from the settings
    assert cfg.wandb.mode == "offline" and cfg.platform == "local"
    assert exp.rl_job().epsilons == (0.2, 0.28) and cfg.experiments["headlines_gspo"].rl_job().epsilons == (3e-4, 4e-4)
    assert cfg.experiments["math_fomaml"].train is None and cfg.experiments["math_fomaml"].meta.outer_steps == 20
    assert exp.sampling(cfg.seed).seed == cfg.seed + 1 and exp.sampling(cfg.seed).max_new_tokens == 128


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_validate(path):
    cfg = load_config(DEFAULT, [path])
    assert cfg.run_experiments and all(n in cfg.experiments for n in cfg.run_experiments)


@pytest.mark.parametrize("path,key,bad,expected", [
    # one nested typo per block: the message names the full key, suggests the near miss and lists what is allowed
    ("sead", "sead", 1, "seed"),
    ("wandb.mdoe", "wandb.mdoe", "online", "mode"),
    ("datasets.headlines.timeout", "datasets.headlines.timeout", 3, "timeout_s"),
    ("datasets.gsm8k.max_trian", "datasets.gsm8k.max_trian", 3, "max_train"),
    ("datasets.math.subject", "datasets.math.subject", ["algebra"], "subjects"),
    ("models.tiny.build.hiden_size", "models.tiny.build.hiden_size", 32, "hidden_size"),
    ("experiments.gsm8k_grpo_lora.train.lerning_rate", "experiments.gsm8k_grpo_lora.train.lerning_rate", 1e-3,
     "learning_rate"),
    ("experiments.gsm8k_grpo_lora.train.lora.dropuot", "experiments.gsm8k_grpo_lora.train.lora.dropuot", 0.1,
     "dropout"),
    ("experiments.headlines_grpo_ued.train.ued.enable", "experiments.headlines_grpo_ued.train.ued.enable", True,
     "enabled"),
    ("experiments.gsm8k_gspo.train.trl.vlm", "experiments.gsm8k_gspo.train.trl.vlm", {}, "vllm"),
    ("experiments.gsm8k_gspo.train.distributed.nprocs", "experiments.gsm8k_gspo.train.distributed.nprocs", 2, "nproc"),
    ("experiments.gsm8k_gspo.warmstart.step", "experiments.gsm8k_gspo.warmstart.step", 3, "steps"),
    ("experiments.gsm8k_gspo.eval.sample", "experiments.gsm8k_gspo.eval.sample", 3, "samples"),
    ("experiments.math_fomaml.meta.outer_step", "experiments.math_fomaml.meta.outer_step", 3, "outer_steps"),
])
def test_typo_in_any_block_names_key_and_allowed(raw, path, key, bad, expected):
    msg = _error(_with(raw, path, bad))
    assert f"unknown key '{key}'" in msg and f"did you mean '{expected}'" in msg and "allowed keys:" in msg


def test_wrong_type_names_value_and_expected(raw):
    msg = _error(_with(raw, "experiments.gsm8k_grpo_lora.train.steps", "ten"))
    assert msg == "config error: 'experiments.gsm8k_grpo_lora.train.steps' is \"ten\" (str); expected an integer"


def test_bad_enum_lists_allowed_values(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.backend", "jax"))
    assert msg == "config error: 'experiments.headlines_gspo.backend' is \"jax\"; allowed values: mlx, torch"


def test_zero_learning_rate_is_refused(raw):
    msg = _error(_with(raw, "experiments.gsm8k_gspo.train.learning_rate", 0))
    assert "'experiments.gsm8k_gspo.train.learning_rate' is 0" in msg and "greater than 0" in msg


def test_unknown_dataset_kind(raw):
    msg = _error(_with(raw, "datasets.gsm8k.kind", "gsmk"))
    assert "'datasets.gsm8k.kind' is \"gsmk\"; allowed values: rss, gsm8k, math" in msg


def test_dataset_kind_branch_rejects_foreign_key(raw):
    assert "unknown key 'datasets.gsm8k.feeds'" in _error(_with(raw, "datasets.gsm8k.feeds", {"x": "y"}))


def test_missing_required_key(raw):
    cfg = copy.deepcopy(raw)
    del cfg["experiments"]["headlines_gspo"]["model"]
    assert _error(cfg) == "config error: 'experiments.headlines_gspo' is missing the required key 'model'"


def test_unknown_model_reference(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.model", "tinyy"))
    assert "experiments.headlines_gspo.model is 'tinyy'" in msg and "did you mean 'tiny'" in msg


def test_prompt_dataset_mismatch(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.prompt", "xml_cot"))
    assert "xml_cot" in msg and "needs a gsm8k dataset" in msg


def test_unknown_reward_lists_valid(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.rewards.sectoins", 1.0))
    assert "unknown reward 'sectoins' (did you mean 'sections'?)" in msg and "coherence" in msg


def test_reward_param_typo_names_the_real_parameters(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.reward_params.length", {"min_word": 30}))
    assert "reward_params.length.min_word" in msg and "min_words (default 40)" in msg and "margin" in msg


def test_reward_param_of_the_wrong_type(raw):
    msg = _error(_with(raw, "experiments.headlines_gspo.reward_params.length", {"min_words": "thirty"}))
    assert "reward_params.length.min_words is 'thirty' (str)" in msg and "expects int" in msg


def test_reward_params_of_an_unused_reward(raw):
    msg = _error(_with(raw, "experiments.gsm8k_gspo.reward_params", {"length": {"min_words": 3}}))
    assert "reward_params.length" in msg and "not in rewards" in msg


def test_every_builtin_reward_has_only_real_parameters():
    """No reward swallows unknown keywords: every parameter is a keyword with a default."""
    from rlmeta.rewards import REGISTRY

    for spec in REGISTRY.values():
        params = inspect.signature(spec.fn).parameters.values()
        assert not any(p.kind is p.VAR_KEYWORD for p in params), spec.name
        spec.params  # noqa: B018 - raises for a parameter without a default


@pytest.mark.parametrize("path,value,needle", [
    ("experiments.headlines_gspo.train.trl", {"bf16": True}, "backend mlx does not use"),
    ("experiments.math_fomaml.train", {"steps": 3}, "configured under 'meta'"),
    ("experiments.gsm8k_gspo.meta", {"outer_steps": 3}, "'meta' is for algorithm fomaml"),
    ("experiments.math_fomaml.backend", "mlx", "fomaml runs on backend torch"),
    ("experiments.math_fomaml.warmstart", {"steps": 10}, "warmstart applies to RL experiments"),
    ("experiments.math_fomaml.meta.shard_size", 3, "must divide nproc"),
    ("experiments.gsm8k_gspo.warmstart.min_lr_ratio", 0.2, None),  # allowed: cosine is the default schedule
    ("models.tiny.build.num_heads", 3, "multiple of num_heads"),
    ("models.tiny_qwen_vocab.build.vocab_size", 4096, "bpe tokenizer only"),
    ("models.tiny.hf", "Qwen/Qwen3-0.6B", "exactly one of 'hf'"),
    ("datasets.math.query_ratio", 0.8, "leaves no held-out rows"),
    ("datasets.headlines.feeds.bad name", "x.xml", "not usable as a file name"),
    ("run_experiments", ["gsm8k_gpo"], "did you mean 'gsm8k_gspo'"),
])
def test_options_that_cannot_work_are_refused_at_start_up(raw, path, value, needle):
    if needle is None:
        validate(_with(raw, path, value))
        return
    assert needle in _error(_with(raw, path, value))


def test_ued_on_torch_is_supported(raw):
    cfg = validate(_with(raw, "experiments.gsm8k_gspo.train.ued", {"enabled": True}))
    assert cfg.experiments["gsm8k_gspo"].rl_job().train.ued.enabled


def test_template_default_rewards(raw):
    cfg = copy.deepcopy(raw)
    del cfg["experiments"]["gsm8k_gspo"]["rewards"]
    exp = validate(cfg).experiments["gsm8k_gspo"]
    from rlmeta.prompts import TEMPLATES

    assert exp.rewards is None and exp.reward_weights == TEMPLATES["xml_cot"].default_rewards


def test_sweep_expands_points(raw):
    cfg = _with(raw, "sweeps", {"lr": {"experiment": "gsm8k_grpo_lora",
                                       "grid": {"train.learning_rate": [1e-4, 1e-3], "train.temperature": [0.7, 1.0]}}})
    out = validate(cfg)
    assert len([n for n in out.experiments if n.startswith("lr__")]) == 4
    point = out.experiments["lr__learning_rate=0.001__temperature=0.7"]
    assert point.train.learning_rate == 1e-3 and point.train.temperature == 0.7


def test_sweep_grid_typo_names_the_sweep(raw):
    cfg = _with(raw, "sweeps", {"s": {"experiment": "gsm8k_gspo", "grid": {"train.lerning_rate": [1.0]}}})
    msg = _error(cfg)
    assert "sweeps.s.grid.train.lerning_rate" in msg and "did you mean 'learning_rate'" in msg


def test_unreadable_config_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML") as e:
        load_config(bad)
    assert "\n" not in str(e.value)


def test_missing_local_dataset_path_is_not_taken_for_a_hub_id(raw):
    cfg = validate(_with(raw, "datasets.gsm8k.source", "resources/gsm8k_typo"))
    with pytest.raises(UserError) as e:
        startup_checks(cfg, ROOT)
    msg = str(e.value)
    assert msg.startswith("datasets.gsm8k.source: resources/gsm8k_typo does not exist") and "'resources'" in msg


def test_missing_feed_file(raw):
    cfg = validate(_with(raw, "datasets.headlines.feeds.guardian", "resources/rss/nope.rss"))
    with pytest.raises(UserError, match=r"datasets\.headlines\.feeds\.guardian: resources/rss/nope\.rss is not a file"):
        startup_checks(cfg, ROOT)


def test_unreachable_hub_model_fails_at_start_up(raw, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(DEFAULT, [ROOT / "config/experiments/gsm8k_grpo_qwen3.yaml"])
    with pytest.raises(UserError) as e:
        startup_checks(cfg, ROOT)
    assert "not in the local Hugging Face cache" in str(e.value) and "check_hub: false" in str(e.value)
    startup_checks(cfg.model_copy(update={"check_hub": False}), ROOT)  # the escape hatch for offline dry runs


def test_schema_file_is_generated_from_the_settings():
    assert (ROOT / "config" / "schema.yaml").read_text() == S.schema_yaml(), "run `rlmeta schema --write`"


def _models_in(annotation) -> list:
    """Settings classes anywhere inside a type annotation (Optional, dict values, Annotated unions)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, S.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_setting_has_a_description():
    """Every field of every settings block says what it does (the schema's descriptions come from them)."""
    seen, todo = set(), [S.Config]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        assert model.__doc__, model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no help text"
            todo += _models_in(field.annotation)
    assert {S.TrainSettings, S.MetaSettings, S.LoraSettings, S.WarmstartSettings, S.EvalSettings, S.MathDataset,
            S.ModelBuild} <= seen


def test_command_line_defaults_come_from_the_settings():
    """The steps' flags take their defaults from the settings, so they cannot disagree with the config."""
    import argparse

    from rlmeta.cli import STEPS
    from rlmeta.data import math_problems

    p = argparse.ArgumentParser()
    math_problems.split_command(p)
    args = p.parse_args(["--train", str(DEFAULT), "--seed", "1", "--out-dir", "x"])
    assert (args.support_ratio, args.query_ratio) == (S.MathDataset.model_fields["support_ratio"].default,
                                                     S.MathDataset.model_fields["query_ratio"].default)
    assert S.SamplingSettings.model_fields["temperature"].default == S.EvalSettings.model_fields["temperature"].default
    assert len(STEPS) >= 20


@pytest.mark.parametrize("extra", [None, *sorted((ROOT / "config" / "experiments").glob("*.yaml"))],
                         ids=lambda p: "default" if p is None else p.name)
def test_blocks_round_trip_through_json(extra):
    """Rules pass dumped blocks to the steps, which validate them again: a dump must read back unchanged."""
    cfg = load_config(DEFAULT, [extra] if extra else [])
    assert S.Config.model_validate_json(cfg.model_dump_json()) == cfg
    for exp in cfg.experiments.values():
        assert S.Experiment.model_validate_json(exp.model_dump_json()) == exp
        if exp.train is not None:
            assert S.RLJob.model_validate_json(exp.rl_job().model_dump_json()) == exp.rl_job()
        sampling = exp.sampling(cfg.seed)
        assert S.SamplingSettings.model_validate_json(sampling.model_dump_json()) == sampling
