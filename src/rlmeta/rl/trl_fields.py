"""``train.trl.extra``: any other field of ``trl.GRPOConfig``, by name, checked at start-up.

The workflow sets some GRPOConfig fields itself, from settings of its own (``OWNED``: the field and the
setting that sets it); ``extra`` may not name those, so that every setting keeps one source of truth. Any
other field of the installed TRL's GRPOConfig may be given: the name is checked against the dataclass's
real fields (an unknown one is one line with the nearest valid names), and the value against the field's
type (pydantic, over ``typing.get_type_hints``: GRPOConfig itself does not check types). trl is imported
only when ``extra`` is not empty (a few seconds), so a config without it starts as fast as before.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any

OWNED: dict[str, str] = {
    "output_dir": "the workflow (the run's checkpoints folder)",
    "run_name": "the workflow (experiment and seed)",
    "seed": "seeds", "data_seed": "seeds",
    "full_determinism": "train.trl.deterministic",
    "use_cpu": "the machine (the CPU when there is no CUDA GPU)",
    "bf16": "train.trl.bf16",
    "activation_checkpointing": "train.gradient_checkpointing",
    "fsdp": "train.distributed.strategy", "fsdp_config": "train.distributed.strategy",
    "deepspeed": "train.distributed.strategy",
    "max_steps": "train.steps (x train.updates_per_batch)",
    "num_iterations": "train.updates_per_batch",
    "num_generations": "train.group_size",
    "per_device_train_batch_size": "train.batch_prompts x train.group_size",
    "gradient_accumulation_steps": "train.batch_prompts (one micro-batch per generation batch)",
    "steps_per_generation": "train.updates_per_batch (one generation batch per rollout step)",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_schedule", "lr_scheduler_kwargs": "train.lr_schedule",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "temperature": "train.temperature",
    "top_p": "train.top_p", "top_k": "train.top_k", "min_p": "train.min_p",
    "repetition_penalty": "train.repetition_penalty",
    "max_completion_length": "train.max_new_tokens",
    "chat_template_kwargs": "train.chat_template_kwargs",
    "importance_sampling_level": "algorithm (grpo: token, gspo: sequence)",
    "epsilon": "train.epsilon_low", "epsilon_high": "train.epsilon_high",
    "beta": "train.beta",
    "scale_rewards": "train.scale_rewards",
    "loss_type": "train.loss_type",
    "reward_weights": "rewards (name: weight)",
    "mask_truncated_completions": "train.mask_truncated",
    **{f: "train.trl.vllm" for f in ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization",
                                      "vllm_tensor_parallel_size", "vllm_max_model_length", "vllm_enable_sleep_mode",
                                      "vllm_server_host", "vllm_server_port")},
    "report_to": "train.trl.report_to",
    "logging_steps": "the workflow (every step, for train_metrics.parquet)",
    "logging_nan_inf_filter": "the workflow (the divergence guard must see every NaN)",
    "save_strategy": "train.checkpoint_every", "save_steps": "train.checkpoint_every",
    "ignore_data_skip": "train.ued.enabled",
}
"""GRPOConfig fields that ``rlmeta.rl.trl_trainer.grpo_config_kwargs`` sets -> the setting to use instead."""


@functools.cache
def grpo_fields() -> dict[str, Any]:
    """Name -> resolved type of every ``__init__`` field of the installed ``trl.GRPOConfig``."""
    import dataclasses
    import typing

    from trl import GRPOConfig

    hints = typing.get_type_hints(GRPOConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(GRPOConfig) if f.init}


def check_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with each value as its field's type; ValueError (one line) for an owned or unknown name or a
    value of the wrong type."""
    if not extra:
        return extra
    import trl
    from pydantic import TypeAdapter, ValidationError

    fields = grpo_fields()
    out = {}
    for name, value in extra.items():
        if name in OWNED:
            raise ValueError(f"'{name}' is set by {OWNED[name]}: set it there, not in train.trl.extra")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(set(fields) - set(OWNED)), n=3, cutoff=0.5)
            hint = f" (nearest: {', '.join(close)})" if close else ""
            raise ValueError(f"'{name}' is not a field of trl.GRPOConfig (trl {trl.__version__}){hint}")
        try:
            out[name] = TypeAdapter(fields[name]).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"'{name}': {value!r} is not a {_type_name(fields[name])} "
                             f"({e.errors()[0]['msg']})") from None
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
