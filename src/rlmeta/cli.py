"""The command line: ``rlmeta <step> [options]``, one subcommand per workflow step.

Every Snakemake rule runs one of these (``python -m rlmeta <step> ...``), and each runs by hand
the same way; ``rlmeta --help`` lists them and ``rlmeta <step> --help`` shows a step's options,
whose defaults come from ``rlmeta.settings``. Logging is set up here, once. A mistake a user can
make (a bad config value, a missing input file, an unreachable hub model, unparseable rows) ends
in one line naming the file or key and what to do, with exit status 2; anything else is a bug
and keeps its traceback.

A step's module is imported only when that step runs, so ``rlmeta --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rlmeta.errors import UserError

STEPS: dict[str, tuple[str, str, str]] = {
    # step: (module, function that adds the arguments and returns the runner, one-line help)
    "fetch-rss": ("rlmeta.data.rss", "fetch_command", "snapshot RSS/Atom feeds (http, https or file) as raw XML"),
    "build-headlines": ("rlmeta.data.rss", "build_command", "parse feed snapshots into headlines.parquet"),
    "prepare-gsm8k": ("rlmeta.data.gsm8k", "command", "GSM8K (hub or local files) -> problems tables"),
    "prepare-math": ("rlmeta.data.math_problems", "prepare_command", "MATH (hub or local files) -> problems tables"),
    "prepare-reasoning-gym": ("rlmeta.data.reasoning_gym", "command",
                              "reasoning-gym procedural tasks -> problems tables (seeded, byte-identical)"),
    "split-math-tasks": ("rlmeta.data.math_problems", "split_command",
                         "per-subject support/query/held-out splits (the meta-learning tasks)"),
    "build-model": ("rlmeta.models.build", "command", "build a tiny Qwen3 (tokenizer + random weights)"),
    "make-prompts": ("rlmeta.prompts", "command", "render an experiment's template into prompts.parquet"),
    "warmstart": ("rlmeta.warmstart", "command", "supervised warm start on reference completions"),
    "generate": ("rlmeta.rollout", "command", "sample completions of a policy into a responses table"),
    "score": ("rlmeta.scoring", "command", "score a responses table: rewards, components and task metrics"),
    "train-mlx": ("rlmeta.rl.mlx_trainer", "command", "GRPO/GSPO on MLX (the project's trainer)"),
    "train-trl": ("rlmeta.rl.trl_trainer", "command", "GRPO/GSPO with TRL's GRPOTrainer (PEFT for LoRA)"),
    "train-fomaml": ("rlmeta.meta.fomaml", "command", "first-order MAML over MATH subjects (plain or torchrun)"),
    "eval-adaptation": ("rlmeta.meta.adaptation_eval", "command",
                        "adapt base and meta-learned initialisations on held-out problems"),
    "evaluate": ("rlmeta.evaluation.evaluate", "command", "paired base-versus-trained comparison -> summary.json"),
    "provenance": ("rlmeta.provenance", "command", "an experiment's provenance.json (code, environment, inputs)"),
    "times": ("rlmeta.provenance", "times_command", "wall time per rule of a finished run (its benchmark files)"),
    "report": ("rlmeta.report.render", "command", "one experiment's report (Markdown, HTML, figures)"),
    "summarize": ("rlmeta.report.summary", "command", "the summary across experiments"),
    "inspect": ("rlmeta.inspect", "command", "sample a checkpoint on your own prompts and show the rewards"),
    "merge-lora": ("rlmeta.policy.lora", "command", "merge a LoRA adapter into a full checkpoint"),
    "launch": ("rlmeta.launch", "command", "run a step under torchrun (one node) or srun + torchrun (SLURM)"),
    "status": ("rlmeta.status", "command", "what Snakemake would run and why (naming changed code modules)"),
    "unlock": ("rlmeta.locks", "command", "remove a killed run's Snakemake locks when no Snakemake uses the folder"),
    "validate": ("rlmeta.cli", "validate_command", "validate config files and print the experiments they define"),
    "schema": ("rlmeta.cli", "schema_command", "print or write config/schema.yaml (generated from the settings)"),
}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlmeta`` console script and of ``python -m rlmeta``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    step, rest = argv[0], argv[1:]
    if step not in STEPS:
        from difflib import get_close_matches

        close = get_close_matches(step, list(STEPS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"rlmeta: unknown step '{step}'{hint}; run `rlmeta --help` for the list", file=sys.stderr)
        return 2
    module, attr, help_text = STEPS[step]
    try:
        load_reward_modules(rest, f"rlmeta {step}")
    except UserError as e:
        print(f"rlmeta {step}: error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"rlmeta {step}", description=help_text[0].upper() + help_text[1:] + ".",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reward_modules(parser)
    runner: Callable = getattr(importlib.import_module(module), attr)(parser)
    if getattr(runner, "passthrough", False):  # a step that hands unknown options on (rlmeta status)
        args, args.extra = parser.parse_known_args(rest)
    else:
        args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
    try:
        status = runner(args)
    except UserError as e:
        print(f"rlmeta {step}: error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


# Rewards users plug in (config `reward_modules`) reach every step one way: `--reward-modules`, an option of
# every step, whose default is $RLMETA_REWARD_MODULES. Every step, not only those that score: provenance,
# report, summarize and evaluate validate experiment blocks, which name rewards, and launch starts another
# step. The workflow exports the variable once, in the shell prefix of rules/common.smk, rather than passing
# a param to each rule: no rule can forget it, child processes (torchrun, srun) inherit it, and, not being a
# param, moving the checkout re-runs nothing (the rules' `code` params carry a hash of the files instead).
# The modules are loaded before the step's options are parsed, because those options (--rewards, --job,
# --config) are validated against the reward registry as they are read.

REWARD_MODULES_ENV = "RLMETA_REWARD_MODULES"
"""The default of ``--reward-modules`` (``os.pathsep``-separated), set by the workflow for every job."""


def add_reward_modules(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-modules", nargs="+", action="extend", metavar="FILE_OR_MODULE",
                   help="reward modules to load first (the config's reward_modules): Python files, importable "
                        "modules or entry points of the group rlmeta.rewards that register rewards with "
                        f"@rlmeta.rewards.register (default: ${REWARD_MODULES_ENV}, {os.pathsep}-separated, which "
                        "the workflow sets)")


def load_reward_modules(argv: Sequence[str], prog: str = "rlmeta") -> list[str]:
    """Load the reward modules of ``--reward-modules`` in ``argv`` (else of ``$RLMETA_REWARD_MODULES``) and
    export them (files as absolute paths) in that variable, for the processes the step starts."""
    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    add_reward_modules(pre)
    specs = pre.parse_known_args(argv)[0].reward_modules or [
        s for s in os.environ.get(REWARD_MODULES_ENV, "").split(os.pathsep) if s]
    if not specs:
        return []  # rlmeta.rewards is not imported for steps that do not use it
    from rlmeta.rewards import load_modules, resolve_spec

    names = load_modules(specs)
    os.environ[REWARD_MODULES_ENV] = os.pathsep.join(resolve_spec(s) for s in specs)
    return names


def usage() -> str:
    width = max(map(len, STEPS))
    lines = ["usage: rlmeta <step> [options]   (rlmeta <step> --help for a step's options)", "", "steps:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, _, help_text) in STEPS.items()]
    return "\n".join(lines)


# -- argument types shared by the steps ------------------------------------------------------------

def existing_file(text: str) -> Path:
    """argparse type: a file that exists (one clear line otherwise)."""
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not p.exists() else f"{text}: not a file")
    return p


def existing_dir(text: str) -> Path:
    """argparse type: a folder that exists."""
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder" if not p.exists() else f"{text}: not a folder")
    return p


def model_ref(text: str) -> str:
    """argparse type: a checkpoint folder (with config.json) or a hub id (owner/name)."""
    from rlmeta.models.hub import is_hub_id

    p = Path(text)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text}: a folder without config.json is not a checkpoint")
        return text
    if is_hub_id(text):
        return text
    raise argparse.ArgumentTypeError(f"{text}: no such checkpoint folder, and not a hub id (owner/name)")


def settings_type(model, what: str):
    """argparse type: a settings block as JSON/YAML text or a .json/.yaml file, validated by ``model``."""
    from rlmeta.settings import ConfigError, parse_json

    def parse(text: str):
        try:
            return parse_json(model, text, what)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def chat_template_kwargs_type(text: str) -> dict:
    """argparse type of ``--chat-template-kwargs``: a JSON/YAML mapping checked as ``train.chat_template_kwargs``."""
    import yaml

    from rlmeta.settings import check_chat_template_kwargs

    try:
        value = yaml.safe_load(text) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{text!r} is not a mapping; give e.g. '{{\"enable_thinking\": false}}'")
        return dict(check_chat_template_kwargs(value))
    except (yaml.YAMLError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"chat_template_kwargs: {' '.join(str(e).split())}") from None


def add_settings(p: argparse.ArgumentParser, flag: str, model, help_text: str, required: bool = False) -> None:
    """``--<flag> JSON``: a whole settings block (keys and defaults listed in the step's --help)."""
    from rlmeta.settings import fields_help

    default = None if required else model()
    p.add_argument(f"--{flag}", type=settings_type(model, flag), default=default, required=required,
                   help=f"{help_text}: JSON/YAML text or a file; missing keys take their defaults (listed below)")
    p.epilog = (p.epilog or "") + f"\n--{flag} keys (default): \n" + "\n".join(fields_help(model)) + "\n"


def add_wandb(p: argparse.ArgumentParser) -> None:
    from rlmeta.settings import WandbSettings

    add_settings(p, "wandb", WandbSettings, "W&B settings (mode, project, entity)")


def add_training_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    """The options both RL trainers take (``train-mlx``, ``train-trl``)."""
    from rlmeta.settings import RLJob

    p.add_argument("--model", required=True, type=model_ref, help="base checkpoint folder (or hub id)")
    p.add_argument("--prompts", required=True, type=existing_file, help="prompts parquet (train split used)")
    add_settings(p, "job", RLJob, "what to train: algorithm, rewards, reward_params, train, max_train_prompts",
                 required=True)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--metrics", required=True, help="train_metrics.parquet to write when training ends")
    p.add_argument("--eval-curve", help="eval_curve.parquet to write when training ends: one row per evaluation "
                                        "during training (train.eval_every)")
    p.add_argument("--rollouts", help="folder to write when training ends: every training completion "
                                      "(train.log_rollouts), one parquet file per checkpoint interval")
    p.add_argument("--seed", type=int, default=0, help="training seed (sampling, prompt order, LoRA init)")
    add_wandb(p)


def default_of(model, name: str):
    """A settings field's default (so that flags and config cannot disagree)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def help_of(model, name: str) -> str:
    field = model.model_fields[name]
    return f"{field.description} (default: {field.get_default(call_default_factory=True)})"


# -- the two config steps ------------------------------------------------------------------------------

def validate_command(p: argparse.ArgumentParser):
    p.add_argument("configfiles", nargs="*", default=["config/config.yaml"],
                   help="config files, merged left to right (default: config/config.yaml)")

    def run(a):
        from rlmeta.settings import load_config

        cfg = load_config(a.configfiles[0], a.configfiles[1:])
        for name, exp in cfg.experiments.items():
            mark = "*" if name in cfg.chosen() else " "
            print(f"{mark} {name}: {exp.algorithm} on {exp.backend}, {exp.dataset} with {exp.prompt}, "
                  f"model {exp.model}")
        print(f"ok: {len(cfg.experiments)} experiments ({len(cfg.chosen())} chosen, marked *)")
    return run


def schema_command(p: argparse.ArgumentParser):
    p.add_argument("--write", action="store_true", help="write config/schema.yaml instead of printing it")
    p.add_argument("--check", action="store_true", help="exit 1 when config/schema.yaml is not current")

    def run(a):
        from rlmeta.settings import SCHEMA_PATH, schema_yaml

        text = schema_yaml()
        if a.check:
            current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
            if current != text:
                print(f"{SCHEMA_PATH} is not current: run `rlmeta schema --write`", file=sys.stderr)
                return 1
            return 0
        if a.write:
            from rlmeta.io import write_text

            write_text(SCHEMA_PATH, text)
            print(f"wrote {os.path.relpath(SCHEMA_PATH)}")
            return 0
        sys.stdout.write(text)
        return 0
    return run


if __name__ == "__main__":
    raise SystemExit(main())
