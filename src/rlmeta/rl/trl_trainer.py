"""GRPO / GSPO on torch with TRL's ``GRPOTrainer`` (LoRA through peft), in the project's formats.

``grpo_config`` maps an experiment's ``train`` block onto ``trl.GRPOConfig``; ``reward_functions``
turns its ``rewards`` into TRL reward functions; ``TrainMetricsCallback`` writes TRL's logs as the
project's ``train_metrics.parquet``; ``train_trl`` runs it all and saves ``<out_dir>/final``.
One TRL optimizer step is one row of train_metrics; a rollout batch gives ``updates_per_batch`` of them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from rlmeta.io import atomic_dir, read_table, write_json
from rlmeta.rl.objectives import default_epsilons
from rlmeta.tracking import MetricsWriter, check_finite, wandb_run

log = logging.getLogger(__name__)

LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
SPEC_FILE = "trl_spec.json"  # what the checkpoints in out_dir were trained with (resume guard)
# TRL log key -> train_metrics column; the GENERATION ones are logged only on steps that sample.
METRIC_KEYS = {
    "loss": "loss", "reward": "reward_mean", "reward_std": "reward_std", "kl": "kl",
    "clip_ratio/region_mean": "clip_ratio", "grad_norm": "grad_norm", "learning_rate": "lr",
    "num_tokens": "tokens", "frac_reward_zero_std": "zero_std_frac", "completions/mean_length": "completion_len_mean",
}
GENERATION_KEYS = ("reward", "reward_std", "num_tokens", "frac_reward_zero_std", "completions/mean_length")


def train_settings(experiment: dict) -> dict:
    """The experiment's ``train`` block with the schema's defaults filled in (``trl`` included)."""
    from rlmeta.config import load_schema

    props = load_schema()["$defs"]["train"]["properties"]
    train = {k: v["default"] for k, v in props.items() if "default" in v}
    train.update(experiment.get("train") or {})
    trl_defaults = {k: v["default"] for k, v in props["trl"]["properties"].items()}
    train["trl"] = {**trl_defaults, **(train.get("trl") or {})}
    train.setdefault("lora", None)
    return train


def grpo_config(experiment: dict, out_dir: str | os.PathLike, seed: int = 0, report_to: str | None = None,
                run_name: str | None = None):
    """``trl.GRPOConfig`` for an experiment on this machine (see ``grpo_config_kwargs``)."""
    from trl import GRPOConfig

    return GRPOConfig(**grpo_config_kwargs(experiment, out_dir, seed, report_to, None, run_name))


def grpo_config_kwargs(experiment: dict, out_dir: str | os.PathLike, seed: int = 0, report_to: str | None = None,
                       cuda: bool | None = None, run_name: str | None = None) -> dict:
    """``trl.GRPOConfig`` keyword arguments for an experiment (keys ``algorithm``, ``rewards``, ``train``).

    One generation batch = ``batch_prompts`` prompts x ``group_size`` completions, trained in one
    micro-batch (``per_device_train_batch_size``, ``steps_per_generation=1``) and reused for
    ``updates_per_batch`` optimizer steps (``num_iterations``); ``max_steps = steps x updates_per_batch``.
    gspo sets ``importance_sampling_level="sequence"``; null epsilons come from ``default_epsilons``.
    CPU (``use_cpu``, fp32) when no CUDA GPU; bf16 autocast on CUDA unless ``trl.bf16`` is false.
    """
    import torch

    algorithm = experiment.get("algorithm", "grpo")
    if algorithm not in ("grpo", "gspo"):
        raise ValueError(f"train_trl runs grpo or gspo, not {algorithm!r}")
    t = train_settings(experiment)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    eps_low, eps_high = default_epsilons(algorithm)
    mu = int(t["updates_per_batch"])
    report_to = report_to or t["trl"]["report_to"]
    return dict(
        output_dir=str(out_dir),
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=bool(cuda) if t["trl"]["bf16"] is None else bool(t["trl"]["bf16"]),
        activation_checkpointing=bool(cuda),  # TRL turns it on (memory for compute); pointless on CPU
        max_steps=int(t["steps"]) * mu,
        num_iterations=mu,
        num_generations=int(t["group_size"]),
        per_device_train_batch_size=int(t["batch_prompts"]) * int(t["group_size"]),
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        learning_rate=float(t["learning_rate"]),
        lr_scheduler_type=LR_SCHEDULES[t["lr_schedule"]],
        warmup_steps=int(t["warmup_steps"]) * mu,
        weight_decay=float(t["weight_decay"]),
        max_grad_norm=math.inf if t["max_grad_norm"] is None else float(t["max_grad_norm"]),  # inf: log, never clip
        temperature=float(t["temperature"]),
        top_p=float(t["top_p"]),
        max_completion_length=int(t["max_new_tokens"]),
        importance_sampling_level="sequence" if algorithm == "gspo" else "token",
        epsilon=eps_low if t["epsilon_low"] is None else float(t["epsilon_low"]),
        epsilon_high=eps_high if t["epsilon_high"] is None else float(t["epsilon_high"]),
        beta=float(t["beta"]),
        scale_rewards=t["scale_rewards"],
        loss_type=t["loss_type"],
        reward_weights=[float(w) for w in (experiment.get("rewards") or {}).values()] or None,
        use_vllm=bool(t["trl"]["use_vllm"]),
        report_to="none" if report_to == "none" else [report_to],
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach check_finite, not be averaged away
        save_strategy="steps",
        save_steps=int(t["checkpoint_every"]) * mu,
    )


def lora_config(lora: dict | None):
    """``peft.LoraConfig`` for a ``train.lora`` block (None = full fine-tuning)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16)),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                      task_type="CAUSAL_LM")


def _text(completion) -> str:
    """A TRL completion (plain text, or conversational [{role, content}]) as text."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion)
    return completion


def reward_functions(rewards: dict[str, float], params: dict | None = None) -> list:
    """One TRL reward function per configured reward, named after it (TRL logs ``rewards/<name>/mean``).

    Each reads the ``reference`` dataset column; ``math_correct`` scores through the
    timeout-guarded ``math_verify_batch`` (``reward_params.math_correct.timeout_s``, ``workers``).
    Weights are not applied here: they go to ``GRPOConfig.reward_weights``.
    """
    from rlmeta.rewards import REGISTRY, math_verify_batch, unknown_rewards

    unknown_rewards(list(rewards))
    funcs = []
    for name in rewards:
        kw = dict((params or {}).get(name, {}))
        spec = REGISTRY[name]

        def fn(prompts, completions, reference=None, _spec=spec, _kw=kw, _name=name, **_):
            refs = reference if reference is not None else [None] * len(completions)
            texts = [_text(c) for c in completions]
            if _name == "math_correct":
                return math_verify_batch(list(zip(texts, refs)), workers=int(_kw.get("workers", 2)),
                                         timeout_s=float(_kw.get("timeout_s", 5.0)))
            return [float(_spec.fn(c, reference=r, prompt=p, **_kw)) for p, c, r in zip(prompts, texts, refs)]

        fn.__name__ = fn.__qualname__ = name
        funcs.append(fn)
    return funcs


def train_dataset(prompts_path: str | os.PathLike, max_prompts: int | None = None):
    """``datasets.Dataset`` of the train split: ``prompt`` (chat messages) and ``reference``."""
    from datasets import Dataset

    rows = [r for r in read_table(prompts_path).select(["split", "prompt", "reference"]).to_pylist()
            if r["split"] == "train"]
    if not rows:
        raise ValueError(f"{prompts_path}: no rows with split == 'train'")
    rows = rows[:max_prompts] if max_prompts else rows
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "reference": [r["reference"] for r in rows]})


class TrainMetricsCallback(TrainerCallback):
    """Writes each logged optimizer step as a train_metrics row, prints it to stderr, stops on NaN/inf.

    TRL logs sampling metrics (reward, lengths, tokens) only on steps that generate; steps that
    reuse the batch (``num_iterations`` > 1) carry them forward. ``tokens`` is TRL's cumulative
    ``num_tokens`` (prompt + completion tokens so far). ``kl`` is null when beta = 0.
    """

    def __init__(self, writer: MetricsWriter, reward_names: list[str], out_dir: str | os.PathLike,
                 last_checkpoint: str | None = None):
        self.writer, self.out_dir, self.last_checkpoint = writer, Path(out_dir), last_checkpoint
        self.keys = {**METRIC_KEYS, **{f"rewards/{n}/mean": f"reward/{n}" for n in reward_names}}
        self.carry: dict = {}
        self.t0, self.step_seconds = None, None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step_seconds = time.perf_counter() - self.t0 if self.t0 is not None else None

    def on_save(self, args, state, control, **kw):
        self.last_checkpoint = str(self.out_dir / f"checkpoint-{state.global_step}")

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs or "train_runtime" in logs:
            return
        gen = [k for k in GENERATION_KEYS if k in logs] + [k for k in logs if k.startswith("rewards/")]
        self.carry.update({k: logs[k] for k in gen})
        merged = {**self.carry, **logs}
        row = {col: merged.get(key) for key, col in self.keys.items()}
        row["tokens"] = int(row["tokens"]) if row["tokens"] is not None else None
        row.update(step=state.global_step, step_seconds=self.step_seconds)
        self.writer.add(row)
        self.writer.flush()
        print(f"step {state.global_step}/{state.max_steps} loss={_fmt(row['loss'])} "
              f"reward={_fmt(row['reward_mean'])} kl={_fmt(row['kl'])} grad_norm={_fmt(row['grad_norm'])} "
              f"len={_fmt(row['completion_len_mean'])} {_fmt(row['step_seconds'])}s", file=sys.stderr, flush=True)
        check_finite({k: v for k, v in row.items() if k != "step"}, state.global_step, self.last_checkpoint)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _resume_checkpoint(out_dir: Path, spec: dict) -> str | None:
    """Latest ``checkpoint-N`` in ``out_dir`` when it was trained with the same spec; stale ones are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    spec_path = out_dir / SPEC_FILE
    if not out_dir.is_dir():
        return None
    same = spec_path.exists() and json.loads(spec_path.read_text()) == json.loads(json.dumps(spec, sort_keys=True))
    if not same:
        for stale in out_dir.glob("checkpoint-*"):
            log.warning("removing %s: trained with a different spec", stale)
            shutil.rmtree(stale)
        return None
    return get_last_checkpoint(str(out_dir))


def save_final(model, tokenizer, path: str | os.PathLike, source: dict | None = None) -> Path:
    """Save the policy atomically as a plain transformers checkpoint that mlx_lm.load also opens.

    LoRA is merged (``merge_and_unload``); weights are safetensors in the base checkpoint's dtype;
    ``source`` (the base config.json) restores what training changed in the config (TRL sets
    ``use_cache`` false and mirrors ``pad_token_id`` into it); ``rope_theta`` is also written at the
    top level, as ``build_tiny_model`` does, for transformers 4.x and older mlx-lm.
    """
    import torch
    from peft import PeftModel

    from rlmeta.models.tokenizer import save_tokenizer

    source = source or {}
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    dtype = source.get("dtype") or source.get("torch_dtype")
    if dtype in ("float32", "bfloat16", "float16"):
        model = model.to(getattr(torch, dtype))
    model.config.use_cache = source.get("use_cache", True)
    if source:
        model.config.pad_token_id = source.get("pad_token_id")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
        if rope is not None:
            cfg["rope_theta"] = rope
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(path)


def _source_config(model_dir: str) -> dict:
    """A local base checkpoint's config.json ({} for a hub id)."""
    cfg = Path(model_dir) / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def train_trl(model_dir: str | os.PathLike, prompts_path: str | os.PathLike, experiment: dict,
              out_dir: str | os.PathLike, metrics_path: str | os.PathLike, wandb_cfg: dict | None = None,
              seed: int = 0, *, callbacks: list | None = None) -> Path:
    """Train ``model_dir`` with TRL GRPO/GSPO on the train prompts; return ``<out_dir>/final``.

    ``experiment``: ``algorithm``, ``rewards`` {name: weight}, ``reward_params``, ``train``.
    ``wandb_cfg``: ``mode`` (offline | online | disabled), ``project``, ``entity``, ``name``.
    Checkpoints go to ``<out_dir>/checkpoint-N`` every ``checkpoint_every`` rollout batches and a
    rerun resumes from the latest one trained with the same spec. ``callbacks``: extra
    ``TrainerCallback``s (e.g. a benchmark's clock).
    """
    from trl import GRPOTrainer

    out_dir = Path(out_dir)
    wandb_cfg = {"mode": "offline", "project": "rlmeta", **(wandb_cfg or {})}
    rewards = dict(experiment.get("rewards") or {})
    if not rewards:
        raise ValueError("experiment has no rewards to train on")
    t = train_settings(experiment)
    report_to = t["trl"]["report_to"]
    if report_to == "wandb" and wandb_cfg["mode"] == "disabled":
        report_to = "none"
    name = wandb_cfg.get("name") or (out_dir.parent.name if out_dir.name == "checkpoints" else out_dir.name)
    args = grpo_config(experiment, out_dir, seed, report_to=report_to, run_name=name)
    spec = {"model": str(model_dir), "seed": seed, "experiment": experiment}
    resume = _resume_checkpoint(out_dir, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SPEC_FILE, spec)
    resume_step = int(re.search(r"checkpoint-(\d+)$", resume).group(1)) if resume else None
    writer = MetricsWriter(metrics_path, [f"reward/{n}" for n in rewards], resume_step=resume_step)
    callback = TrainMetricsCallback(writer, list(rewards), out_dir, last_checkpoint=resume)
    log.info("TRL %s: %s -> %s (%d optimizer steps%s)", experiment.get("algorithm"), model_dir, out_dir,
             args.max_steps, f", resuming {resume}" if resume else "")
    if resume_step is not None and resume_step >= args.max_steps:
        # transformers would train one step past max_steps when resumed at the end: load instead
        writer.close()
        model, tokenizer = _load_checkpoint(model_dir, resume)
        return _save(model, tokenizer, out_dir, model_dir)
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward_functions(rewards, experiment.get("reward_params")),
        args=args,
        train_dataset=train_dataset(prompts_path, experiment.get("max_train_prompts")),
        peft_config=lora_config(t["lora"]),
        callbacks=[callback, *(callbacks or [])],
    )
    if report_to == "wandb":
        config = {**spec, "out_dir": str(out_dir)}
        with wandb_run(wandb_cfg["mode"], wandb_cfg["project"], wandb_cfg.get("entity"), name, out_dir, config):
            trainer.train(resume_from_checkpoint=resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    writer.close()
    return _save(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out_dir, model_dir)


def _save(model, tokenizer, out_dir: Path, model_dir) -> Path:
    final = save_final(model, tokenizer, out_dir / "final", _source_config(str(model_dir)))
    log.info("saved %s", final)
    return final


def _load_checkpoint(model_dir, checkpoint: str):
    """(policy, tokenizer) of a TRL checkpoint folder: full weights, or the base plus a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(checkpoint)
    if (ckpt / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(ckpt))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    return model, AutoTokenizer.from_pretrained(str(ckpt))


def main(argv: list[str] | None = None) -> int:
    """Command line of ``scripts/train_trl.py``."""
    from rlmeta.rl.cli import run_trainer

    return run_trainer(train_trl, "train_trl.py", "GRPO/GSPO with TRL's GRPOTrainer.", 'folder for checkpoint-N/ and final/', argv)
