"""Load and validate the workflow configuration.

``load_config`` reads YAML, rejects anything the JSON schema in
``config/schema.yaml`` does not allow with one line that names the key, the bad
value and what is allowed, fills defaults, and checks cross-references
(experiment -> dataset, model, rewards).
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "config" / "schema.yaml"

PROMPT_DATASET_KIND = {"inner_scientist": "rss", "xml_cot": "gsm8k", "math_boxed": "math"}


class ConfigError(ValueError):
    """A configuration problem, worded as one line that says what to fix."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The configuration's JSON schema."""
    return yaml.safe_load(Path(path).read_text())


def load_config(path: str | Path, overrides: list[str | Path] = ()) -> dict:
    """Read YAML config file(s) (later ones merge over earlier), validate and fill defaults."""
    config: dict = {}
    for p in [path, *overrides]:
        with open(p) as fh:
            config = merge(config, yaml.safe_load(fh) or {})
    return validate(config)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge as Snakemake does for --configfile (over wins)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _leaf(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """Descend into if/then, allOf and oneOf branches to the most specific error."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator != "oneOf"))
    return error


def format_error(error: jsonschema.ValidationError) -> str:
    """One line: the key, the bad value and what is allowed."""
    error = _leaf(error)
    where = _path(error)
    value = error.instance
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        key = f"{where}.{extra[0]}" if where != "<top level>" and extra else (extra[0] if extra else where)
        hint = f"allowed keys: {', '.join(allowed)}" if allowed else "no keys are allowed here"
        return f"config error: unknown key '{key}'; {hint}"
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"config error: '{where}' is {json.dumps(value)}; allowed values: {allowed}"
    if error.validator == "const":
        return f"config error: '{where}' is {json.dumps(value)}; expected {json.dumps(error.validator_value)}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"config error: '{where}' is {json.dumps(value)} ({type(value).__name__}); expected {expected}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"config error: '{where}' is missing the required key '{missing}'"
    if error.validator == "oneOf" and isinstance(value, dict) and "models" in where:
        return f"config error: '{where}' needs exactly one of 'hf' (hub id or path) or 'build' (tiny local model)"
    return f"config error: '{where}' = {json.dumps(value, default=str)}: {error.message}"


def _fill_defaults(node: Any, schema: dict, root: dict) -> Any:
    if "$ref" in schema:
        schema = _resolve(schema["$ref"], root)
    if not isinstance(node, dict):
        return node
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):  # the if/then of dataset kinds
        cond = sub.get("if", {}).get("properties", {})
        if all(node.get(k) == v.get("const") for k, v in cond.items()):
            props.update(sub.get("then", {}).get("properties", {}))
    for key, sub in props.items():
        sub_resolved = _resolve(sub["$ref"], root) if "$ref" in sub else sub
        if key not in node and "default" in sub_resolved:
            node[key] = copy.deepcopy(sub_resolved["default"])
        if key in node:
            node[key] = _fill_defaults(node[key], sub_resolved, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in node:
            if key not in props:
                node[key] = _fill_defaults(node[key], extra, root)
    return node


def _resolve(ref: str, root: dict) -> dict:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def validate(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` against the schema and cross-references; return it with defaults.

    Raises ``ConfigError`` with a one-line message for the first problem found.
    """
    schema = schema or load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        raise ConfigError(format_error(errors[0]))
    config = _fill_defaults(copy.deepcopy(config), schema, schema)
    config["experiments"] = expand_sweeps(config)
    _check_references(config)
    return config


def _check_references(config: dict) -> None:
    from rlmeta.rewards import REGISTRY  # local import: rewards pull in math-verify

    for name in config.get("run_experiments") or []:
        if name not in config["experiments"]:
            raise ConfigError(
                f"config error: 'run_experiments' names '{name}', not a key of experiments; "
                f"defined: {', '.join(sorted(config['experiments']))}"
            )
    for name, exp in config["experiments"].items():
        where = f"experiments.{name}"
        for key, pool in (("dataset", "datasets"), ("model", "models")):
            if exp[key] not in config[pool]:
                valid = ", ".join(sorted(config[pool])) or "(none defined)"
                raise ConfigError(f"config error: '{where}.{key}' is '{exp[key]}', not a key of {pool}; defined: {valid}")
        kind = config["datasets"][exp["dataset"]]["kind"]
        want = PROMPT_DATASET_KIND[exp["prompt"]]
        if kind != want:
            raise ConfigError(
                f"config error: '{where}.prompt' is '{exp['prompt']}', which needs a {want} dataset, "
                f"but '{exp['dataset']}' is {kind}"
            )
        if exp["algorithm"] == "fomaml" and (exp["backend"] != "torch" or kind != "math"):
            raise ConfigError(f"config error: '{where}': algorithm fomaml needs backend torch and a math dataset")
        if exp["algorithm"] != "fomaml" and not exp["rewards"]:
            raise ConfigError(f"config error: '{where}.rewards' is empty; name at least one reward: {', '.join(sorted(REGISTRY))}")
        for reward in list(exp["rewards"]) + list(exp["reward_params"]):
            if reward not in REGISTRY:
                raise ConfigError(
                    f"config error: '{where}.rewards' names unknown reward '{reward}'; valid rewards: {', '.join(sorted(REGISTRY))}"
                )


def expand_sweeps(config: dict) -> dict:
    """Experiments plus one experiment per point of each sweep grid (name ``<sweep>__k=v__...``)."""
    experiments = dict(config["experiments"])
    for sweep, spec in config.get("sweeps", {}).items():
        if spec["experiment"] not in experiments:
            raise ConfigError(f"config error: 'sweeps.{sweep}.experiment' is '{spec['experiment']}', not a key of experiments")
        keys = list(spec["grid"])
        for values in itertools.product(*(spec["grid"][k] for k in keys)):
            exp = copy.deepcopy(experiments[spec["experiment"]])
            parts = []
            for key, value in zip(keys, values):
                node = exp
                *parents, last = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[last] = value
                parts.append(f"{last}={_slug(value)}")
            experiments[f"{sweep}__" + "__".join(parts)] = exp
    return experiments


def _slug(value) -> str:
    """A path- and regex-safe rendering of a sweep value (lists joined with '+')."""
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def experiment(config: dict, name: str) -> dict:
    """One experiment's block with its dataset and model blocks attached."""
    if name not in config["experiments"]:
        raise ConfigError(f"unknown experiment '{name}'; defined: {', '.join(sorted(config['experiments']))}")
    exp = copy.deepcopy(config["experiments"][name])
    exp["name"] = name
    exp["dataset_config"] = config["datasets"][exp["dataset"]]
    exp["model_config"] = config["models"][exp["model"]]
    exp["seed"] = config["seed"]
    return exp
