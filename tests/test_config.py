"""Config validation: the default and experiment configs pass; mistakes give one clear line."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rlmeta.config import ConfigError, load_config, load_schema, validate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(DEFAULT.read_text())


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_default_validates_and_fills_defaults():
    cfg = load_config(DEFAULT)
    exp = cfg["experiments"]["gsm8k_grpo_lora"]
    assert exp["train"]["beta"] == 0.0  # a default from the schema
    assert exp["train"]["ued"]["enabled"] is False
    assert cfg["wandb"]["mode"] == "offline"
    assert cfg["platform"] == "local"


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_validate(path):
    cfg = load_config(DEFAULT, [path])
    assert cfg["experiments"]


def test_typo_in_key_names_key_and_allowed(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["gsm8k_grpo_lora"]["train"]["lerning_rate"] = 1e-3
    msg = _error(cfg)
    assert "experiments.gsm8k_grpo_lora.train.lerning_rate" in msg
    assert "learning_rate" in msg and "allowed keys" in msg


def test_top_level_typo(raw):
    cfg = copy.deepcopy(raw)
    cfg["sead"] = 1
    msg = _error(cfg)
    assert "'sead'" in msg and "seed" in msg


def test_wrong_type_names_value_and_expected(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["gsm8k_grpo_lora"]["train"]["steps"] = "ten"
    msg = _error(cfg)
    assert "experiments.gsm8k_grpo_lora.train.steps" in msg and '"ten"' in msg and "integer" in msg


def test_bad_enum_lists_allowed_values(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["headlines_gspo"]["backend"] = "jax"
    msg = _error(cfg)
    assert "experiments.headlines_gspo.backend" in msg and "jax" in msg and "mlx, torch" in msg


def test_unknown_reward_lists_valid(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["headlines_gspo"]["rewards"]["sectoins"] = 1.0
    msg = _error(cfg)
    assert "sectoins" in msg and "sections" in msg and "coherence" in msg


def test_dataset_kind_branch_rejects_foreign_key(raw):
    cfg = copy.deepcopy(raw)
    cfg["datasets"]["gsm8k"]["feeds"] = {"x": "y"}
    msg = _error(cfg)
    assert "datasets.gsm8k.feeds" in msg


def test_missing_required_key(raw):
    cfg = copy.deepcopy(raw)
    del cfg["experiments"]["headlines_gspo"]["model"]
    msg = _error(cfg)
    assert "experiments.headlines_gspo" in msg and "'model'" in msg


def test_unknown_model_reference(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["headlines_gspo"]["model"] = "gpt5"
    msg = _error(cfg)
    assert "gpt5" in msg and "tiny" in msg


def test_prompt_dataset_mismatch(raw):
    cfg = copy.deepcopy(raw)
    cfg["experiments"]["headlines_gspo"]["prompt"] = "xml_cot"
    msg = _error(cfg)
    assert "xml_cot" in msg and "gsm8k" in msg


def test_sweep_expands_points(raw):
    cfg = copy.deepcopy(raw)
    cfg["sweeps"] = {"lr": {"experiment": "gsm8k_grpo_lora", "grid": {"train.learning_rate": [1e-4, 1e-3], "train.temperature": [0.7, 1.0]}}}
    out = validate(cfg)
    names = [n for n in out["experiments"] if n.startswith("lr__")]
    assert len(names) == 4
    point = out["experiments"]["lr__learning_rate=0.001__temperature=0.7"]
    assert point["train"]["learning_rate"] == 1e-3 and point["train"]["temperature"] == 0.7


def test_every_schema_property_is_documented():
    """Every key of the schema carries a description (or is a plain numeric knob of a documented block)."""
    schema = load_schema()

    def walk(node, path):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("description") or path.count("/") > 3 or path == "", f"{path} lacks a description"
            for k, v in node.items():
                walk(v, f"{path}/{k}")

    walk(schema, "")
