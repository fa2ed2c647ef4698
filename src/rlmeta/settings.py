"""Typed settings: every configuration key with its type, default and meaning, in one place.

One pydantic model per config block (in the spirit of TRL's ``GRPOConfig``): each field has a
type, a default and a help text that says what it does and, where it comes from a paper, which.
These models are the single source of defaults: ``config/schema.yaml`` is generated from them
(``rlmeta schema --write``; a test proves the file is current), the command line of every step
takes its defaults from them, and steps receive these objects, never loose dicts.

``load_config`` / ``validate`` read the YAML, reject anything these models do not allow with one
line that names the key, the bad value and what is allowed (``ConfigError``), and check what
spans blocks (an experiment's dataset and model exist, the template fits the dataset, every
reward parameter is a real parameter of that reward, options a backend does not support).
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rlmeta.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "config" / "schema.yaml"

MATH_TYPES = {
    "Algebra": "algebra",
    "Counting & Probability": "counting_and_probability",
    "Geometry": "geometry",
    "Intermediate Algebra": "intermediate_algebra",
    "Number Theory": "number_theory",
    "Prealgebra": "prealgebra",
    "Precalculus": "precalculus",
}
"""MATH's ``type`` field -> the subject slug used in paths, config and the ``subject`` column."""
MATH_SUBJECTS = tuple(MATH_TYPES.values())
MathSubject = Literal[MATH_SUBJECTS]
TemplateName = Literal["inner_scientist", "xml_cot", "math_boxed", "reasoning_gym"]
Schedule = Literal["constant", "linear", "cosine"]
Backend = Literal["mlx", "torch"]

DEFAULT_EPSILONS = {"grpo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}
"""(epsilon_low, epsilon_high) when ``train.epsilon_low/high`` are null. grpo: 0.2 / 0.28, the DAPO
"clip-higher" pair (Yu et al. 2025; TRL's own default is 0.2 / 0.2 and its docs recommend 0.28).
gspo: 3e-4 / 4e-4 (GSPO, Zheng et al. 2025), sized for the sequence-level ratio, which stays far
closer to 1 than token ratios."""


class ConfigError(UserError, ValueError):
    """A configuration problem, worded as one line that says what to fix."""


def opt(default: Any = ..., help: str = "", **constraints) -> Any:
    """A settings field: default, help text (the schema's ``description``) and constraints."""
    if isinstance(default, (dict, list)):
        value = copy.deepcopy(default)
        return Field(default_factory=lambda: copy.deepcopy(value), description=help, **constraints)
    return Field(default, description=help, **constraints)


class Block(BaseModel):
    """A config block: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_schedule(block) -> None:
    # compared with the default, not with "was it set", so that a dumped and re-read block validates alike
    default = type(block).model_fields["min_lr_ratio"].default
    if block.lr_schedule != "cosine" and block.min_lr_ratio != default:
        raise ValueError(f"min_lr_ratio applies to lr_schedule cosine only (this block is {block.lr_schedule}); "
                         "drop it or set lr_schedule: cosine")


# -- run tracking --------------------------------------------------------------------------------

class WandbSettings(Block):
    """Weights & Biases logging. The API key is read from WANDB_API_KEY and never written."""

    mode: Literal["offline", "online", "disabled"] = opt(
        "offline", "offline needs no account or network (`wandb sync` uploads later); online reads "
        "WANDB_API_KEY; disabled logs nothing to W&B.")
    project: str = opt("rlmeta", "W&B project name.")
    entity: str | None = opt(None, "W&B entity (team or user); null = the account's default.")


# -- datasets ------------------------------------------------------------------------------------

FEED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RSSDataset(Block):
    """News headlines from RSS/Atom feeds (seed 000's inner-scientist data)."""

    kind: Literal["rss"] = opt(..., "rss: news headlines from feeds.")
    feeds: dict[str, str] = opt(..., "Feed name -> http(s) URL, file:// URL or path relative to the workflow "
                                     "folder. Names become file names (letters, digits, _ . -).", min_length=1)
    timeout_s: float = opt(10.0, "Per-request timeout for http(s) feeds, in seconds.", gt=0)
    retries: int = opt(2, "Extra attempts for an http(s) feed that fails (exponential back-off).", ge=0)
    user_agent: str = opt("rlmeta/0.1 (research workflow; feedparser)", "User-Agent header sent to http(s) feeds.")
    eval_fraction: float = opt(0.25, "Share of headlines held out for evaluation (split by a stable hash).",
                               gt=0, lt=1)

    @field_validator("feeds")
    @classmethod
    def _feed_names(cls, feeds: dict[str, str]) -> dict[str, str]:
        bad = [n for n in feeds if not FEED_NAME.match(n)]
        if bad:
            raise ValueError(f"feed name {bad[0]!r} is not usable as a file name: use letters, digits, _ . -")
        return feeds


class GSM8KDataset(Block):
    """Grade-school maths word problems (GSM8K, Cobbe et al. 2021)."""

    kind: Literal["gsm8k"] = opt(..., "gsm8k: grade-school maths.")
    source: str = opt(..., "Hub id (openai/gsm8k) or a local folder with train/test .jsonl or .parquet.")
    max_train: int | None = opt(None, "Keep the first N train rows (null = every row).", ge=1)
    max_test: int | None = opt(None, "Keep the first N test rows (null = every row).", ge=1)


class MathDataset(Block):
    """Competition mathematics (MATH, Hendrycks et al. 2021); its subjects are the meta-learning tasks."""

    kind: Literal["math"] = opt(..., "math: MATH competition problems.")
    source: str = opt(..., "Hub id (EleutherAI/hendrycks_math) or a local folder with train/test .jsonl or "
                           ".parquet in the MATH release's fields.")
    subjects: list[MathSubject] = opt(list(MATH_SUBJECTS), "MATH subjects kept (the meta-learning tasks).",
                                      min_length=1)
    support_ratio: float = opt(0.30, "Share of each subject's train rows in its support set.", gt=0, lt=1)
    query_ratio: float = opt(0.40, "Share in its query set; the rest is held out for adaptation.", gt=0, lt=1)
    max_train: int | None = opt(None, "Keep N train rows, round-robin over subjects (null = every row).", ge=1)
    max_test: int | None = opt(None, "Keep N test rows, round-robin over subjects (null = every row).", ge=1)

    @model_validator(mode="after")
    def _ratios(self) -> MathDataset:
        if len(set(self.subjects)) != len(self.subjects):
            raise ValueError(f"subjects lists a subject twice: {self.subjects}")
        if self.support_ratio + self.query_ratio >= 1:
            raise ValueError(f"support_ratio + query_ratio = {self.support_ratio + self.query_ratio:g} leaves no "
                             "held-out rows for the adaptation evaluation; make their sum below 1")
        return self


class ReasoningGymDataset(Block):
    """Procedural tasks with their own verifiers from reasoning-gym (Stojanovski et al. 2025): each task is one of
    its generators with the parameters of its config class; items are drawn reproducibly from ``seed``."""

    kind: Literal["reasoning_gym"] = opt(..., "reasoning_gym: procedural tasks generated by reasoning-gym.")
    tasks: dict[str, dict[str, Any]] = opt(
        ..., "reasoning-gym task name (e.g. basic_arithmetic, chain_sum) -> keyword arguments of its config class "
             "(e.g. {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}); seed and size are set by the "
             "workflow. Items are shared out evenly over the tasks.", min_length=1)
    train_size: int = opt(512, "Train items, over all tasks.", ge=1)
    eval_size: int = opt(128, "Held-out (test) items, over all tasks.", ge=1)
    seed: int | None = opt(None, "Seed of the generators (null = the workflow's seed); the same seed gives "
                                 "byte-identical tables.", ge=0)
    distinct: bool = opt(True, "No question appears twice, nor in both splits (test questions are never "
                               "trained on); false draws every split independently, so a small task's "
                               "questions recur.")

    @model_validator(mode="after")
    def _tasks(self) -> ReasoningGymDataset:
        from rlmeta.data.reasoning_gym import check_task

        for name, params in self.tasks.items():
            check_task(name, params, where=f"tasks.{name}")
        return self


Dataset = Annotated[RSSDataset | GSM8KDataset | MathDataset | ReasoningGymDataset, Field(discriminator="kind")]
DATASET_KINDS = {"rss": RSSDataset, "gsm8k": GSM8KDataset, "math": MathDataset, "reasoning_gym": ReasoningGymDataset}


# -- models --------------------------------------------------------------------------------------

class ModelBuild(Block):
    """A tiny Qwen3 built from scratch on this machine (random weights, float32, tied embeddings)."""

    tokenizer: Literal["bpe", "qwen"] = opt(..., "bpe = a byte-level BPE trained on the bundled corpus; qwen = "
                                                 "the real Qwen2.5 tokenizer in resources/ (151,665 tokens).")
    vocab_size: int = opt(2048, "BPE vocabulary size (bpe only; qwen has its own).", ge=300)
    hidden_size: int = opt(64, "Model width.", ge=8)
    num_layers: int = opt(2, "Decoder layers.", ge=1)
    num_heads: int = opt(4, "Attention heads (must divide hidden_size).", ge=1)
    num_kv_heads: int = opt(2, "Key/value heads (grouped-query attention; must divide num_heads).", ge=1)
    intermediate_size: int = opt(256, "Width of the SwiGLU MLP.", ge=8)
    max_position_embeddings: int = opt(2048, "Longest sequence the RoPE tables cover.", ge=64)

    @model_validator(mode="after")
    def _shape(self) -> ModelBuild:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}, "
                             f"and num_heads of num_kv_heads {self.num_kv_heads}")
        if self.tokenizer == "qwen" and self.vocab_size != type(self).model_fields["vocab_size"].default:
            raise ValueError("vocab_size applies to the bpe tokenizer only; drop it (qwen has 151,665 tokens)")
        return self


class ModelSettings(Block):
    """A model: a hub id / local path (``hf``, optionally ``mlx``), or a ``build`` block for a tiny local one."""

    hf: str | None = opt(None, "Hub id or local folder loaded by transformers (e.g. Qwen/Qwen3-1.7B).")
    mlx: str | None = opt(None, "Hub id or local folder loaded by mlx_lm.load (null = hf).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to pin.")
    build: ModelBuild | None = opt(None, "Build a tiny Qwen3 locally instead of loading one.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if (self.hf is None) == (self.build is None):
            raise ValueError("needs exactly one of 'hf' (hub id or path) or 'build' (tiny local model)")
        if self.build is not None and (self.mlx or self.revision):
            raise ValueError("'mlx' and 'revision' apply to hub models (hf) only, not to a build block")
        return self

    def source(self, backend: str) -> str | None:
        """Hub id or path to load on ``backend`` (None for a built model: its folder is a workflow output)."""
        if self.build is not None:
            return None
        return (self.mlx or self.hf) if backend == "mlx" else self.hf


# -- training ------------------------------------------------------------------------------------

class LoraSettings(Block):
    """A LoRA adapter (Hu et al. 2021): peft on torch, mlx-lm's LoRA layers on MLX; scaling alpha / r on both."""

    r: int = opt(8, "Adapter rank.", ge=1)
    alpha: float = opt(16.0, "Scaling numerator: the update is (alpha / r) B A.", gt=0)
    dropout: float = opt(0.0, "Dropout on the adapter's input.", ge=0, lt=1)
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                                    "Linear layers (by name inside each decoder layer) that get adapters.",
                                    min_length=1)


class WarmstartSettings(Block):
    """Supervised fine-tuning on reference completions before RL, so that the base policy emits the
    format the rewards look for (shared by experiments with the same model, data and settings)."""

    steps: int = opt(0, "Optimizer steps (0 = no warm start: RL starts from the model itself).", ge=0)
    batch_size: int = opt(16, "Sequences per step.", ge=1)
    learning_rate: float = opt(1e-3, "Peak AdamW learning rate.", gt=0)
    lr_schedule: Schedule = opt("cosine", "Learning-rate schedule after warm-up.")
    min_lr_ratio: float = opt(0.1, "Cosine only: the learning rate decays to this fraction of its peak.", ge=0, le=1)
    warmup_steps: int = opt(0, "Linear warm-up steps from 0.", ge=0)
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clipping (null = off).", gt=0)
    max_seq_len: int = opt(512, "Prompt + completion tokens kept per example (longer prompts are skipped).", ge=16)
    backend: Backend | None = opt(None, "Backend of the SFT (null = the experiment's). The checkpoint format is "
                                        "shared, so an MLX experiment may warm-start on torch where MLX runs "
                                        "on the CPU only (Linux).")

    @model_validator(mode="after")
    def _schedule(self) -> WarmstartSettings:
        _check_schedule(self)
        return self


class UEDSettings(Block):
    """Unsupervised-environment-design prompt selection: Prioritized Level Replay (Jiang et al. 2021) over
    training prompts, scored by learning potential (seed 001). Works on both backends."""

    enabled: bool = opt(False, "Draw prompts by learning potential instead of a shuffled pass.")
    staleness_weight: float = opt(0.3, "Mix weight rho of the staleness term, so that no prompt starves.", ge=0, le=1)
    temperature: float = opt(1.0, "Temperature of the rank-based priorities (lower = greedier).", gt=0)


Strategy = Literal["ddp", "fsdp", "zero3"]


class DistributedSettings(Block):
    """How ``train_trl`` spreads over processes. ``rlmeta launch`` starts them (torchrun on one node; srun + a c10d
    rendezvous over several SLURM nodes, as for FOMAML) and accelerate, inside transformers' Trainer, wraps the model.
    See docs/training.md ("Several processes")."""

    nproc: int = opt(1, "Training processes: the job's GPUs under profiles/slurm (its resources.gpu; nodes from "
                        "resources.nodes), CPU processes (gloo) elsewhere. The global batch (batch_prompts x "
                        "group_size per optimizer step) is split between them, so it is the same for any count.",
                     ge=1)
    strategy: Strategy = opt(
        "ddp", "ddp: a full replica per process, gradients all-reduced (CPU or GPU); fsdp: FSDP2 through "
               "accelerate (parameters, gradients and optimizer state sharded over the processes; CUDA only); "
               "zero3: DeepSpeed ZeRO-3 (CUDA only, the deepspeed extra).")
    cpu_offload: bool = opt(False, "fsdp / zero3: keep parameters and optimizer state in CPU memory between uses.")


class VLLMSettings(Block):
    """Rollouts generated by vLLM through TRL (Linux with CUDA; the vllm extra). See docs/training.md ("vLLM")."""

    mode: Literal["colocate", "server"] = opt(
        "colocate", "colocate: a vLLM engine inside each training process, sharing its GPU (TRL's vllm_mode "
                    "colocate); server: `trl vllm-serve` on GPUs of its own in the same job, the others train "
                    "(TRL's server mode, one node).")
    gpu_memory_utilization: float = opt(0.3, "Share of a GPU's memory vLLM may take (colocate: the rest is "
                                             "training's; TRL's default).", gt=0, le=1)
    tensor_parallel_size: int = opt(1, "GPUs one vLLM engine spans (colocate: must divide train.distributed.nproc).",
                                    ge=1)
    server_gpus: int = opt(1, "server: GPUs of the job that serve (the first visible ones; a multiple of "
                              "tensor_parallel_size, one data-parallel engine per group); the other "
                              "train.distributed.nproc train.", ge=1)
    max_model_length: int | None = opt(None, "Context length of the vLLM engine (null = the model's).", ge=1)
    enable_sleep_mode: bool = opt(False, "colocate: offload vLLM's weights and KV cache while the training step runs.")
    port: int = opt(8000, "server: the HTTP port of the server (on the job's node).", ge=1024, le=65535)

    @model_validator(mode="after")
    def _layout(self) -> VLLMSettings:
        if self.mode == "server" and self.server_gpus % self.tensor_parallel_size:
            raise ValueError(f"vllm.server_gpus {self.server_gpus} must be a multiple of vllm.tensor_parallel_size "
                             f"{self.tensor_parallel_size} (each engine spans tensor_parallel_size GPUs)")
        return self


class TRLSettings(Block):
    """Options of the TRL backend only (backend torch)."""

    vllm: VLLMSettings | None = opt(None, "Generate the rollouts with vLLM (null = transformers' generate). Needs "
                                          "CUDA and the vllm extra: a machine without them stops at start-up.")
    report_to: Literal["wandb", "tensorboard", "none"] = opt("wandb", "Where transformers' Trainer logs.")
    bf16: bool | None = opt(None, "bf16 autocast (null = on with CUDA, off on the CPU).")
    deterministic: bool = opt(
        False, "Deterministic torch kernels (transformers' enable_full_determinism: torch.use_deterministic_"
               "algorithms, CUBLAS_WORKSPACE_CONFIG=:16:8, deterministic cuDNN and flash-attention): GPU runs that "
               "repeat bit for bit, at some speed; CPU runs repeat without it. See docs/reproducibility.md.")
    extra: dict[str, Any] = opt(
        {}, "Any other trl.GRPOConfig field, by name (e.g. {top_entropy_quantile: 0.2, num_generations_eval: 2}): "
            "checked against the installed TRL's fields and their types at start-up, recorded with the run. "
            "Fields the workflow sets from its own settings are refused with the setting to use instead "
            "(rlmeta.rl.trl_fields.OWNED). See docs/training.md.")

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        from rlmeta.rl.trl_fields import check_extra

        return check_extra(v)


SHAPING = ("top_p", "top_k", "min_p", "repetition_penalty")
"""What shapes a draw besides the temperature (``rlmeta.policy.base.Shaping``): fields of TrainSettings,
EvalSettings (null = training's) and SamplingSettings."""


def shaping_of(settings) -> dict[str, Any]:
    """``generate`` keyword arguments of TrainSettings or SamplingSettings: top_p, top_k, min_p, repetition_penalty."""
    return {k: getattr(settings, k) for k in SHAPING}


CHAT_TEMPLATE_KWARGS_HELP = (
    "Extra keyword arguments of the tokenizer's chat template, applied to every RL prompt (rollouts, warm "
    "start, evaluation, inspect; TRL's GRPOConfig.chat_template_kwargs), e.g. {enable_thinking: false} for "
    "Qwen3, whose thinking block otherwise spends max_new_tokens. Keys: identifiers; values: true/false, "
    "numbers, strings or null.")


def check_chat_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``kwargs`` unchanged, or ValueError (one line) naming a key that is not an identifier or a value that is
    not a JSON scalar (bool, int, float, str, null): what a chat template can take from a config."""
    for key, value in (kwargs or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"key {key!r} is not a keyword argument name; keys must be Python identifiers "
                             "(e.g. enable_thinking)")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{key} is {json.dumps(value, default=str)}; allowed values: true/false, a number, "
                             "a string or null (no lists or mappings)")
    return kwargs


class GuardSettings(Block):
    """The divergence guard: stop a run that has gone wrong, naming the last checkpoint written before it
    did (whose weights were finite). A NaN or infinite loss, gradient norm or weight always stops at once."""

    patience: int = opt(3, "Consecutive steps a divergence condition must hold before the run stops.", ge=1)
    zero_grad_norm: float | None = opt(
        0.0, "Stop when the gradient norm stays at or below this although the rewards still differ within "
             "groups, i.e. there is a learning signal but no gradient (saturated weights; null = off).", ge=0)
    param_norm_ratio: float | None = opt(
        10.0, "Stop when the norm of all weights stays above this multiple of its value at the first step "
              "(weights blowing up; null = off).", gt=1)


class RLGuardSettings(GuardSettings):
    """The divergence guard of an RL run (see GuardSettings), with the reward collapse condition."""

    reward_floor: bool = opt(True, "Stop when the mean rollout reward stays at the lowest value the reward mix "
                                   "can take, after having been above it (a collapse).")


class TrainSettings(Block):
    """RL training: GRPO (Shao et al. 2024) or GSPO (Zheng et al. 2025) on either backend. See docs/training.md."""

    steps: int = opt(20, "Rollout batches; each gives updates_per_batch optimizer steps.", ge=1)
    batch_prompts: int = opt(8, "Prompts per rollout batch.", ge=1)
    group_size: int = opt(4, "Completions per prompt (G): a group shares a baseline (GRPO).", ge=2)
    learning_rate: float = opt(1e-5, "Peak AdamW learning rate.", gt=0)
    lr_schedule: Schedule = opt("constant", "Learning-rate schedule after warm-up (transformers' schedulers on "
                                            "torch, mlx.optimizers schedules on MLX: the same values).")
    warmup_steps: int = opt(0, "Linear warm-up, in rollout batches.", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float | None = opt(1.0, "Gradient-norm clipping (null = off; the norm is still logged).", gt=0)
    temperature: float = opt(1.0, "Sampling temperature of the rollouts (and of the log-probs trained on).", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much mass.", gt=0, le=1)
    top_k: int = opt(0, "Sample among the k most likely tokens only (0 = off; Qwen3's card suggests 20).", ge=0)
    min_p: float = opt(0.0, "Drop tokens below min_p x the most likely token's probability (Nguyen et al. 2024; "
                            "0 = off).", ge=0, le=1)
    repetition_penalty: float = opt(
        1.0, "CTRL's repetition penalty (Keskar et al. 2019) on tokens already in the prompt or completion "
             "(1 = off, above 1 discourages repeats). Shapes the draw only: trained log-probs stay the model's.",
        gt=0)
    max_new_tokens: int = opt(128, "Longest completion, in tokens.", ge=1)
    gradient_checkpointing: bool | None = opt(
        None, "Recompute each decoder layer's activations in the backward pass: memory for compute (null = on with "
              "CUDA on torch, off on the CPU and on MLX). torch: TRL's activation checkpointing (under "
              "distributed.strategy fsdp, FSDP's own: no second all-gather); MLX: mlx-lm's grad_checkpoint on each "
              "layer during the update (Metal, bfloat16/float16; the float32 CPU fast path has its own layer loop "
              "and ignores it).")
    chat_template_kwargs: dict[str, Any] = opt({}, CHAT_TEMPLATE_KWARGS_HELP)
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "MLX only: the dtype of the policy's and the KL reference's weights (bfloat16 halves a Mac's "
                   "memory; float32 takes the CPU fast path). The torch backend: train.trl.bf16.")
    updates_per_batch: int = opt(1, "Optimizer updates per rollout batch (TRL's num_iterations, PPO's epochs): "
                                    "above 1 the importance ratio and its clipping matter.", ge=1)
    epsilon_low: float | None = opt(None, "Lower clip range of the ratio (null = 0.2 for GRPO, 3e-4 for GSPO).", ge=0)
    epsilon_high: float | None = opt(None, "Upper clip range (null = 0.28 for GRPO, DAPO's clip-higher; 4e-4 for "
                                           "GSPO).", ge=0)
    beta: float = opt(0.0, "Weight of the k3 KL estimate to the frozen reference (0 = no reference model, as "
                           "DAPO and Dr. GRPO recommend).", ge=0)
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "Advantage scaling by the reward std: per group (GRPO), over the batch, or none (Dr. GRPO, "
                 "Liu et al. 2025).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = opt(
        "dapo", "Token aggregation of the loss: grpo (per-sequence mean), bnpo (batch token mean), dr_grpo "
                "(constant normaliser), dapo (tokens of the whole generation batch; TRL's default).")
    overlong_buffer: int | None = opt(
        None, "DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), L_cache in tokens: a completion longer than "
              "max_new_tokens - overlong_buffer gets a penalty falling linearly from 0 to -1 at max_new_tokens, "
              "added (times overlong_penalty) to its total reward before the advantages; logged as reward/overlong "
              "(null = off, as in TRL; DAPO uses 4096 of 20480). Must be below max_new_tokens.", ge=1)
    overlong_penalty: float = opt(1.0, "Weight of the overlong penalty in the total reward (overlong_buffer only; "
                                       "DAPO: 1).", gt=0)
    mask_truncated: bool = opt(
        False, "DAPO's overlong filtering: completions that hit max_new_tokens without a stop token are left out of "
               "the loss; their rewards still enter their group's advantages, as in TRL, whose "
               "mask_truncated_completions it sets on torch (off by default, as in TRL).")
    dynamic_sampling: int = opt(
        0, "DAPO's dynamic sampling: groups whose rewards are all equal (no gradient) are dropped and up to this "
           "many extra rollout batches are drawn until batch_prompts groups with a reward spread are collected; "
           "the step trains on the groups kept (fewer when the budget runs out). 0 = off, as in TRL. Logged as "
           "dynamic_extra_batches and dynamic_groups_kept. On torch each process fills its own share (batch_prompts "
           "a multiple of distributed.nproc); extra prompts are drawn uniformly (UED sees the step's own batch).",
        ge=0)
    ued: UEDSettings = opt({}, "Prompt selection by learning potential (seed 001).")
    lora: LoraSettings | None = opt(None, "Train a LoRA adapter instead of every weight (null = full fine-tuning).")
    checkpoint_every: int = opt(10, "Write a resumable checkpoint every N rollout batches.", ge=1)
    eval_every: int | None = opt(
        10, "Evaluate on held-out prompts before training, every N rollout batches and after the last, into "
            "eval_curve.parquet and W&B (null = off): a run that collapses is seen while it runs.", ge=1)
    eval_prompts: int = opt(16, "Held-out prompts (the first N of the eval split) of each evaluation during "
                                "training, one completion each.", ge=1)
    eval_temperature: float = opt(0.0, "Sampling temperature of the evaluations during training (0 = greedy: the "
                                       "curve moves only when the policy does).", ge=0)
    log_rollouts: bool = opt(True, "Keep every training completion with its rewards, advantage, length and "
                                   "truncation in rollouts/ (and a W&B table).")
    trl: TRLSettings = opt({}, "TRL-only options (backend torch).")
    distributed: DistributedSettings = opt({}, "Processes and sharding of the TRL trainer (backend torch).")
    guard: RLGuardSettings = opt({}, "When to stop a run that diverges.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _chat_template_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_chat_template_kwargs(v)

    @model_validator(mode="after")
    def _dapo(self) -> TrainSettings:
        if self.overlong_buffer is not None and self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} must be below max_new_tokens "
                             f"{self.max_new_tokens} (the penalty ramps over the last overlong_buffer tokens)")
        default_penalty = type(self).model_fields["overlong_penalty"].default
        if self.overlong_buffer is None and self.overlong_penalty != default_penalty:
            raise ValueError("overlong_penalty applies when overlong_buffer is set; drop it or set overlong_buffer")
        n, batch = self.distributed.nproc, self.batch_prompts * self.group_size
        v = self.trl.vllm
        if v is not None and v.mode == "colocate" and n % v.tensor_parallel_size:
            raise ValueError(f"trl.vllm.tensor_parallel_size {v.tensor_parallel_size} must divide distributed.nproc "
                             f"{n} (colocated engines span groups of training processes)")
        if batch % n:
            raise ValueError(f"distributed.nproc {n} must divide the global batch batch_prompts x group_size = "
                             f"{self.batch_prompts} x {self.group_size} = {batch} (each process trains an equal "
                             "share of it)")
        return self


def _check_backend_train(backend: str, train: TrainSettings | None) -> None:
    """Training options a backend cannot run (ValueError, one line)."""
    if backend == "torch" and train is not None and train.dtype != "float32":
        raise ValueError(f"train.dtype is {train.dtype}, but it sets the MLX trainer's weights; on backend torch "
                         "set train.trl.bf16: true (bf16 autocast, the default on CUDA) and leave train.dtype")
    if backend == "mlx" and train is not None and train.distributed != DistributedSettings():
        raise ValueError(f"train.distributed is {train.distributed.model_dump()}, but the MLX trainer runs in one "
                         "process (a Mac has one GPU); drop train.distributed or set backend: torch")
    if backend == "torch" and train is not None and train.dynamic_sampling and \
            train.batch_prompts % train.distributed.nproc:
        raise ValueError(f"train.dynamic_sampling needs whole groups on each process, but batch_prompts "
                         f"{train.batch_prompts} is not a multiple of distributed.nproc {train.distributed.nproc}; "
                         "set batch_prompts to a multiple of nproc or train.dynamic_sampling: 0")


MetaMethod = Literal["fomaml", "reptile", "multitask"]
META_EVAL_KEYS = ("baselines", "eval_episodes", "eval_query", "curve_steps", "accuracy_episodes")
"""MetaSettings keys only the adaptation evaluation reads: a change to them re-trains nothing."""


class MetaSettings(Block):
    """Meta-learning over the MATH subjects: first-order MAML (Finn et al. 2017), Reptile (Nichol et al. 2018) or
    multi-task fine-tuning at the same budget, and the held-out-subject evaluation. See docs/meta-learning.md."""

    method: MetaMethod = opt(
        "fomaml", "What the experiment trains into <exp>/checkpoints/final: fomaml (k SGD steps on a task's support "
                  "batch, the query gradient at the adapted weights), reptile (k + 1 SGD steps on the same support "
                  "and query batches; meta-gradient (theta - mean phi) / (inner_lr (k + 1)) fed to AdamW) or "
                  "multitask (the gradients of the same k + 1 passes at theta: plain fine-tuning on the union of the "
                  "training subjects). All three take the same batches, gradient passes and tokens per outer step.")
    baselines: list[MetaMethod] = opt(
        [], "Other methods trained with the same settings and budget into <exp>/baselines/<method>/ and compared in "
            "the adaptation evaluation; the base initialisation (no training) is always evaluated.")
    test_subjects: list[MathSubject] = opt(
        ["intermediate_algebra", "precalculus"],
        "Held-out subjects: never in meta-training (every method trains on the dataset's other subjects); the "
        "adaptation evaluation adapts on them, and separately on the held-out rows of the training subjects.")
    validate_every: int = opt(0, "Meta-validation every N outer steps: post-adaptation query loss on test_subjects "
                                 "into train_metrics (val/*) and W&B (0 = off).", ge=0)
    validate_episodes: int = opt(2, "Episodes per test subject in each meta-validation.", ge=1)
    eval_episodes: int = opt(8, "Adaptation episodes per subject in the evaluation (seeded support and query draws, "
                                "the same for every method).", ge=1)
    eval_query: int = opt(8, "Query problems per episode, drawn apart from its support set.", ge=1)
    curve_steps: int | None = opt(None, "Adaptation curve: query loss after k = 0..K inner steps (null = 2 x "
                                        "inner_steps).", ge=1)
    accuracy_episodes: int | None = opt(
        None, "Episodes per subject whose adapted model also answers its query problems greedily (math-verify "
              "accuracy; null = every episode, 0 = none).", ge=0)

    outer_steps: int = opt(20, "Meta-updates (outer optimizer steps).", ge=1)
    meta_batch_size: int = opt(4, "Tasks (subjects) per outer step.", ge=1)
    inner_steps: int = opt(2, "k SGD steps on a task's support batch (the fast weights).", ge=1)
    inner_lr: float = opt(1e-3, "Learning rate of the inner SGD steps.", gt=0)
    outer_lr: float = opt(1e-3, "Peak AdamW learning rate of the meta-update.", gt=0)
    support_batch: int = opt(8, "Support examples per task and outer step.", ge=1)
    query_batch: int = opt(8, "Query examples per task and outer step.", ge=1)
    max_seq_len: int = opt(384, "Prompt + solution tokens kept per example.", ge=16)
    max_grad_norm: float | None = opt(1.0, "Clipping of the meta-gradient norm (null = off).", gt=0)
    warmup_steps: int = opt(0, "Linear warm-up of the outer learning rate, in outer steps.", ge=0)
    lr_schedule: Schedule = opt("cosine", "Outer learning-rate schedule after warm-up.")
    nproc: int = opt(1, "torchrun processes (GPUs on a cluster; CPU processes here).", ge=1)
    shard_size: int = opt(0, "Ranks that FSDP2-shard one model copy; the others adapt tasks in parallel "
                             "(0 = all ranks on CUDA, 1 on the CPU). Must divide nproc.", ge=0)
    fsdp_units: Literal["auto", "layers", "model"] = opt(
        "auto", "What FSDP2 gathers at once when shard_size > 1: layers (each decoder layer, then the root: one "
                "layer unsharded at a time, for models that do not fit one device), model (the whole model as one "
                "unit: a few large collectives per pass instead of ~3 per layer; for small models on "
                "latency-bound links such as gloo on the CPU: 2 processes 1.87-1.96x one there, per layer 1.55-1.75x). "
                "auto = layers on CUDA, model on the CPU.")
    lora: LoraSettings | None = opt(None, "Meta-learn only a LoRA adapter (meta-LoRA; null = every weight).")
    checkpoint_every: int = opt(10, "Write a resumable checkpoint every N outer steps.", ge=1)
    keep_checkpoints: int = opt(2, "Resumable checkpoints kept (older ones are pruned).", ge=1)
    guard: GuardSettings = opt({}, "When to stop a run that diverges.")
    deterministic: bool = opt(
        False, "Deterministic torch kernels (transformers' enable_full_determinism: torch.use_deterministic_"
               "algorithms, CUBLAS_WORKSPACE_CONFIG=:16:8, deterministic cuDNN and flash-attention): GPU runs that "
               "repeat bit for bit, at some speed; CPU runs repeat without it. See docs/reproducibility.md.")

    @model_validator(mode="after")
    def _layout(self) -> MetaSettings:
        if self.shard_size and self.nproc % self.shard_size:
            raise ValueError(f"shard_size {self.shard_size} must divide nproc {self.nproc}")
        if self.method in self.baselines or len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines {self.baselines} must not repeat a method or hold method {self.method}; "
                             "allowed: the others of fomaml, reptile, multitask")
        if len(set(self.test_subjects)) != len(self.test_subjects):
            raise ValueError(f"test_subjects lists a subject twice: {self.test_subjects}")
        return self

    @property
    def adaptation_steps(self) -> int:
        """K of the adaptation curve."""
        return self.curve_steps or 2 * self.inner_steps


class EvalSettings(Block):
    """Held-out evaluation: base and trained policy sample the same prompts with the same seeds."""

    split: Literal["eval"] = opt("eval", "Prompt split evaluated.")
    samples: int = opt(4, "Completions per prompt.", ge=1)
    max_prompts: int | None = opt(64, "Evaluate the first N eval prompts (null = all).", ge=1)
    temperature: float = opt(0.8, "Sampling temperature (0 = greedy).", ge=0)
    top_p: float | None = opt(None, "Nucleus sampling mass (null = train.top_p).", gt=0, le=1)
    top_k: int | None = opt(None, "Top-k sampling (null = train.top_k; 0 = off).", ge=0)
    min_p: float | None = opt(None, "Min-p sampling (null = train.min_p; 0 = off).", ge=0, le=1)
    repetition_penalty: float | None = opt(None, "Repetition penalty (null = train.repetition_penalty; 1 = off).",
                                           gt=0)
    max_new_tokens: int | None = opt(None, "Longest completion (null = train.max_new_tokens; 128 for FOMAML).", ge=1)
    chat_template_kwargs: dict[str, Any] | None = opt(
        None, "Chat template keyword arguments of the evaluation's prompts (null = train.chat_template_kwargs; "
              "{} for FOMAML, whose prompts take none), e.g. {enable_thinking: false} for Qwen3.")
    seed: int | None = opt(None, "Sampling seed (null = the global seed + 1, so evaluation never replays a "
                                 "training draw).")
    bootstrap: int = opt(2000, "Bootstrap resamples of the paired 95% interval.", ge=100)
    report_samples: int = opt(6, "Prompts shown with their base and trained completions in the report.", ge=0)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _chat_template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_chat_template_kwargs(v)


class SamplingSettings(Block):
    """How ``rlmeta generate`` samples: the evaluation settings resolved against training's."""

    split: str = opt("eval", "Prompt split to use (null = every row).")
    samples: int = opt(EvalSettings.model_fields["samples"].default, "Completions per prompt.", ge=1)
    max_prompts: int | None = opt(None, "Use the first N prompts of the split (null = all).", ge=1)
    temperature: float = opt(EvalSettings.model_fields["temperature"].default, "Sampling temperature (0 = greedy).",
                             ge=0)
    top_p: float = opt(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = opt(0, "Top-k sampling (0 = off).", ge=0)
    min_p: float = opt(0.0, "Min-p sampling (0 = off).", ge=0, le=1)
    repetition_penalty: float = opt(1.0, "Repetition penalty (1 = off).", gt=0)
    max_new_tokens: int = opt(128, "Longest completion, in tokens.", ge=1)
    chat_template_kwargs: dict[str, Any] = opt({}, "Chat template keyword arguments of the prompts (e.g. "
                                                   "{enable_thinking: false} for Qwen3).")
    seed: int = opt(0, "Seed of the first batch; batch b uses derive_seed('rollout', seed, b).")
    batch_size: int = opt(8, "Prompts per generation batch (x samples completions).", ge=1)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _chat_template_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_chat_template_kwargs(v)


# -- experiments ---------------------------------------------------------------------------------

RewardParams = dict[str, dict[str, Any]]


class RewardMix(Block):
    """Rewards, their weights and parameters (what ``rlmeta score`` takes)."""

    rewards: dict[str, float] = opt(..., "Reward name -> weight; the total is the weighted sum.", min_length=1)
    reward_params: RewardParams = opt({}, "Reward name -> keyword arguments of that reward.")

    @model_validator(mode="after")
    def _check(self) -> RewardMix:
        check_rewards(self.rewards, self.reward_params)
        return self


class RLJob(Block):
    """What an RL trainer needs from an experiment: a change to any of it re-trains, nothing else does."""

    algorithm: Literal["grpo", "gspo"] = opt("grpo", "grpo: token-level ratios; gspo: one sequence-level ratio.")
    rewards: dict[str, float] = opt(..., "Reward name -> weight; the total is the weighted sum.", min_length=1)
    reward_params: RewardParams = opt({}, "Reward name -> keyword arguments of that reward.")
    train: TrainSettings = opt({}, "Training settings.")
    max_train_prompts: int | None = opt(None, "Cap on train prompts (null = all).", ge=1)
    backend: Backend = opt("torch", "Backend that trains it.")
    template: TemplateName | None = opt(
        None, "The prompt template: its task metrics (accuracy, format) are measured in the evaluations during "
              "training (null = rewards only).")

    @model_validator(mode="after")
    def _check(self) -> RLJob:
        check_rewards(self.rewards, self.reward_params)
        _check_backend_train(self.backend, self.train)
        if self.train.overlong_buffer is not None and "overlong" in self.rewards:
            raise ValueError("a reward named 'overlong' clashes with the overlong penalty's reward/overlong column; "
                             "rename the reward or drop train.overlong_buffer")
        return self

    @property
    def reward_floor(self) -> float:
        """The lowest total reward the mix can give: each reward at the end of its range its weight makes worst."""
        from rlmeta.rewards import REGISTRY

        floor = sum(min(w * REGISTRY[n].range[0], w * REGISTRY[n].range[1]) for n, w in self.rewards.items())
        if self.train.overlong_buffer is not None:  # the overlong penalty reaches -1 at max_new_tokens
            floor -= self.train.overlong_penalty
        return float(floor)

    @property
    def epsilons(self) -> tuple[float, float]:
        """(epsilon_low, epsilon_high): the configured ones, else the algorithm's defaults."""
        low, high = DEFAULT_EPSILONS[self.algorithm]
        t = self.train
        return (low if t.epsilon_low is None else t.epsilon_low, high if t.epsilon_high is None else t.epsilon_high)


class Experiment(Block):
    """One experiment: an RL run (grpo | gspo) or a meta-learning run (fomaml) and its evaluation."""

    dataset: str = opt(..., "A key of datasets.")
    prompt: TemplateName = opt(..., "Prompt template (rlmeta.prompts.TEMPLATES).")
    model: str = opt(..., "A key of models.")
    backend: Backend = opt(..., "mlx (mlx-lm; Metal on a Mac, CPU on Linux) or torch (transformers, TRL).")
    algorithm: Literal["gspo", "grpo", "fomaml"] = opt(..., "Training algorithm.")
    rewards: dict[str, float] | None = opt(None, "Reward name -> weight; the total reward is the weighted sum "
                                                 "(null = the template's default rewards).")
    reward_params: RewardParams = opt({}, "Reward name -> keyword arguments of that reward (checked against "
                                          "the reward function's parameters).")
    max_train_prompts: int | None = opt(None, "Cap on train prompts (null = all).", ge=1)
    max_eval_prompts: int | None = opt(None, "Cap on eval prompts in prompts.parquet (null = all).", ge=1)
    warmstart: WarmstartSettings = opt({}, "Supervised warm start before RL.")
    train: TrainSettings | None = opt(None, "RL settings (grpo, gspo; filled with defaults there).")
    meta: MetaSettings | None = opt(None, "Meta-learning settings (fomaml; filled with defaults there).")
    eval: EvalSettings = opt({}, "Held-out evaluation.")
    seeds: list[int] | None = opt(
        None, "Training seeds (RL): each is its own run in <exp>/seed<N>/, all evaluated against the same base "
              "responses; the summary gives every seed's paired difference and their mean and IQM with intervals "
              "across seeds (Agarwal et al. 2021). null = one run with the global seed.", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _blocks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("algorithm") == "fomaml":
            if data.get("train") is not None:
                raise ValueError("algorithm fomaml is configured under 'meta', not 'train': move the keys there")
            data.setdefault("meta", {})
            data["meta"] = {} if data["meta"] is None else data["meta"]
        elif data.get("algorithm") in ("grpo", "gspo"):
            if data.get("meta") is not None:
                raise ValueError(f"'meta' is for algorithm fomaml; algorithm {data['algorithm']} is configured "
                                 "under 'train'")
            data["train"] = {} if data.get("train") is None else data["train"]
        return data

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        from rlmeta.prompts import TEMPLATES

        if self.algorithm == "fomaml":
            if self.backend != "torch":
                raise ValueError("algorithm fomaml runs on backend torch (torchrun, FSDP2); set backend: torch")
            if self.warmstart.steps:
                raise ValueError("warmstart applies to RL experiments; FOMAML starts from the model itself")
            if self.seeds is not None:
                raise ValueError("seeds applies to RL experiments (grpo, gspo); a fomaml experiment trains with the "
                                 "global seed: drop seeds")
        else:
            if self.backend == "mlx" and self.train.trl != TRLSettings():
                raise ValueError("train.trl holds options of the TRL backend, which backend mlx does not use; "
                                 "drop it or set backend: torch")
            _check_backend_train(self.backend, self.train)
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeats a seed: each seed is one run")
        if self.seeds is not None and any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds {self.seeds}: seeds are non-negative integers")
        rewards = self.rewards if self.rewards is not None else TEMPLATES[self.prompt].default_rewards
        check_rewards(rewards, self.reward_params)
        return self

    def run_seeds(self, global_seed: int) -> list[int]:
        """The training seeds of an RL experiment (``seeds``, else the global seed alone)."""
        return list(self.seeds) if self.seeds is not None else [global_seed]

    @property
    def reward_weights(self) -> dict[str, float]:
        """The rewards and weights in effect (the template's defaults when ``rewards`` is null)."""
        from rlmeta.prompts import TEMPLATES

        return dict(self.rewards if self.rewards is not None else TEMPLATES[self.prompt].default_rewards)

    def rl_job(self) -> RLJob:
        """The part of an RL experiment its trainer depends on."""
        if self.train is None:
            raise ValueError("rl_job() of a fomaml experiment")
        return RLJob(algorithm=self.algorithm, rewards=self.reward_weights, reward_params=self.reward_params,
                     train=self.train, max_train_prompts=self.max_train_prompts, backend=self.backend,
                     template=self.prompt)

    def sampling(self, seed: int) -> SamplingSettings:
        """The held-out evaluation's sampling, with nulls resolved (``seed``: the global seed)."""
        ev, t = self.eval, self.train
        default_tokens = 128 if t is None else t.max_new_tokens

        def shaping(key: str):  # eval's value, else training's, else off
            if getattr(ev, key) is not None:
                return getattr(ev, key)
            return getattr(t, key) if t is not None else SamplingSettings.model_fields[key].get_default(
                call_default_factory=True)

        return SamplingSettings(
            split=ev.split, samples=ev.samples, max_prompts=ev.max_prompts, temperature=ev.temperature,
            **{k: shaping(k) for k in SHAPING},
            max_new_tokens=ev.max_new_tokens or default_tokens,
            chat_template_kwargs=shaping("chat_template_kwargs"),
            seed=seed + 1 if ev.seed is None else ev.seed)


def check_rewards(rewards: dict[str, float], params: RewardParams) -> None:
    """Every reward is registered; every parameter is a real parameter of its reward with a value of its type."""
    from rlmeta.rewards import REGISTRY

    for name in list(rewards) + list(params):
        if name not in REGISTRY:
            raise ValueError(f"unknown reward '{name}'{_did_you_mean(name, REGISTRY)}; valid rewards: "
                             f"{', '.join(sorted(REGISTRY))}")
    for name, kw in params.items():
        if name not in rewards:
            raise ValueError(f"reward_params.{name} sets parameters of a reward that is not in rewards "
                             f"({', '.join(rewards)}): add it to rewards or drop its parameters")
        REGISTRY[name].check_params(kw, where=f"reward_params.{name}")


def _check_test_subjects(name: str, meta: MetaSettings, subjects: list[str]) -> None:
    missing = [s for s in meta.test_subjects if s not in subjects]
    if missing:
        raise ValueError(f"experiments.{name}.meta.test_subjects {missing} are not subjects of its dataset "
                         f"({', '.join(subjects)}); pick test subjects from those")
    if not [s for s in subjects if s not in meta.test_subjects]:
        raise ValueError(f"experiments.{name}.meta.test_subjects {meta.test_subjects} leaves no subject to "
                         "meta-train on; hold out fewer subjects")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# -- sweeps and the whole config -----------------------------------------------------------------

class Sweep(Block):
    """A parameter grid over an experiment: each point becomes its own experiment
    ``<sweep>__<key>=<value>__...`` with its own results folder."""

    experiment: str = opt(..., "The experiment to vary.")
    grid: dict[str, list[Any]] = opt(..., "Dotted key inside the experiment (e.g. train.learning_rate) -> "
                                          "list of values.")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list]) -> dict[str, list]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give at least one value")
            _resolve_field(Experiment, key.split("."), f"grid.{key}")
        return grid


class Config(Block):
    """Every key of config/config.yaml and config/experiments/*.yaml."""

    seed: int = opt(..., "Global seed; every split, sample and training run derives its seed from it.")
    results: str = opt("results", "Folder that receives every output (ignored by git).")
    platform: Literal["local", "apple-silicon", "slurm"] = opt(
        "local", "Where the jobs run; set by the profile (profiles/*/config.yaml). Under slurm, MLX experiments "
                 "are left out (MLX needs Apple Silicon, or runs on the CPU only).")
    run_experiments: list[str] | None = opt(None, "Experiments that `all` builds (null = every experiment). "
                                                  "config/experiments/*.yaml set it to their own experiment.")
    check_hub: bool = opt(True, "At start-up, check that every hub model and dataset the chosen experiments use "
                                "is in the local Hugging Face cache or reachable (false: skip, e.g. for a dry "
                                "run on an offline machine).")
    wandb: WandbSettings = opt({}, "Weights & Biases logging.")
    reward_modules: list[str] = opt(
        [], "Rewards users plug in: Python files (paths relative to the workflow folder) or installed modules "
            "(importable names, or entry points of the group rlmeta.rewards) whose functions register rewards "
            "with @rlmeta.rewards.register, as the built-in ones (docs/rewards.md). Loaded before the experiments "
            "are validated, and by every step the workflow runs; editing such a file re-runs the jobs of the "
            "experiments that use its rewards.")
    datasets: dict[str, Dataset] = opt(..., "Named data sources; experiments refer to them by name.")
    models: dict[str, ModelSettings] = opt(..., "Named models; experiments refer to them by name.")
    experiments: dict[str, Experiment] = opt(..., "Named experiments; each gets results/<name>/.")
    sweeps: dict[str, Sweep] = opt({}, "Named parameter grids over an experiment.")

    @model_validator(mode="before")
    @classmethod
    def _expand_sweeps(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("sweeps"), dict) and isinstance(data.get("experiments"), dict):
            for sweep, spec in data["sweeps"].items():
                for key in (spec or {}).get("grid") or {} if isinstance(spec, dict) else ():
                    _resolve_field(Experiment, str(key).split("."), f"sweeps.{sweep}.grid.{key}")
            data = dict(data, experiments=expand_sweeps(data["experiments"], data["sweeps"]))
        return data

    @field_validator("reward_modules")
    @classmethod
    def _load_reward_modules(cls, specs: list[str], info: ValidationInfo) -> list[str]:
        # a field before experiments: pydantic validates fields in order, so the rewards are registered first
        from rlmeta.rewards import load_modules

        load_modules(specs, (info.context or {}).get("base"))
        return specs

    @model_validator(mode="after")
    def _references(self) -> Config:
        from rlmeta.prompts import TEMPLATES

        for name in self.run_experiments or []:
            if name not in self.experiments:
                raise ValueError(f"run_experiments names '{name}', not a key of experiments"
                                 f"{_did_you_mean(name, self.experiments)}; defined: "
                                 f"{', '.join(sorted(self.experiments))}")
        for name, exp in self.experiments.items():
            for key, pool in (("dataset", self.datasets), ("model", self.models)):
                value = getattr(exp, key)
                if value not in pool:
                    raise ValueError(f"experiments.{name}.{key} is '{value}', not a key of {key}s"
                                     f"{_did_you_mean(value, pool)}; defined: {', '.join(sorted(pool)) or '(none)'}")
            kind, want = self.datasets[exp.dataset].kind, TEMPLATES[exp.prompt].dataset_kind
            if kind != want:
                raise ValueError(f"experiments.{name}.prompt is '{exp.prompt}', which needs a {want} dataset, but "
                                 f"'{exp.dataset}' is {kind}")
            if exp.algorithm == "fomaml" and kind != "math":
                raise ValueError(f"experiments.{name}: algorithm fomaml needs a math dataset (its subjects are "
                                 "the tasks)")
            if exp.algorithm == "fomaml" and kind == "math":
                _check_test_subjects(name, exp.meta, self.datasets[exp.dataset].subjects)
        for sweep, spec in self.sweeps.items():
            if spec.experiment not in self.experiments:
                raise ValueError(f"sweeps.{sweep}.experiment is '{spec.experiment}', not a key of experiments")
        feeds: dict[str, str] = {}
        for ds_name, ds in self.datasets.items():
            for feed in getattr(ds, "feeds", {}):
                if feed in feeds:
                    raise ValueError(f"feed name '{feed}' appears in datasets '{feeds[feed]}' and '{ds_name}'; "
                                     "feed names must be unique")
                feeds[feed] = ds_name
        return self

    def experiment(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise ConfigError(f"unknown experiment '{name}'; defined: {', '.join(sorted(self.experiments))}")
        return self.experiments[name]

    def chosen(self) -> list[str]:
        """Experiments `all` builds: run_experiments (or every one), MLX ones left out under slurm."""
        names = self.run_experiments or list(self.experiments)
        return [n for n in names if not (self.platform == "slurm" and self.experiments[n].backend == "mlx")]


def expand_sweeps(experiments: dict, sweeps: dict) -> dict:
    """Experiments (raw dicts) plus one per point of each sweep grid (name ``<sweep>__k=v__...``)."""
    out = dict(experiments)
    for sweep, spec in (sweeps or {}).items():
        ok = isinstance(spec, dict) and spec.get("experiment") in experiments and isinstance(spec.get("grid"), dict)
        if not ok:
            continue  # reported by Sweep / Config validation
        keys = list(spec["grid"])
        if not all(isinstance(spec["grid"][k], list) for k in keys):
            continue
        for values in itertools.product(*(spec["grid"][k] for k in keys)):
            exp = copy.deepcopy(experiments[spec["experiment"]])
            parts = []
            for key, value in zip(keys, values):
                node = exp
                *parents, last = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {}) if isinstance(node.get(p), dict) or p not in node else node[p]
                    if node is None:
                        break
                if isinstance(node, dict):
                    node[last] = value
                parts.append(f"{last}={_slug(value)}")
            out[f"{sweep}__" + "__".join(parts)] = exp
    return out


def _slug(value) -> str:
    """A path- and regex-safe rendering of a sweep value (lists joined with '+')."""
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


# -- loading and error messages ------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str | Path] = (), base: str | Path | None = None) -> Config:
    """Read YAML config file(s) (later ones merge over earlier, as Snakemake's --configfile) and validate
    (``base``: the workflow folder, which ``reward_modules`` paths are relative to; default the current one)."""
    raw: dict = {}
    for p in [path, *overrides]:
        try:
            with open(p) as fh:
                raw = merge(raw, yaml.safe_load(fh) or {})
        except OSError as e:
            raise ConfigError(f"config error: cannot read config file {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p} is not valid YAML: {' '.join(str(e).split())}") from None
    return validate(raw, base)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge as Snakemake does for --configfile (over wins)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(raw: dict, base: str | Path | None = None) -> Config:
    """The validated ``Config`` of a raw config mapping; ``ConfigError`` (one line) on the first problem.
    ``base``: the workflow folder (``reward_modules`` paths are relative to it; default the current folder)."""
    return parse(Config, raw, context={"base": None if base is None else str(base)})


def parse(model: type[BaseModel], raw: Any, prefix: str = "", context: dict | None = None):
    """``model.model_validate(raw)`` with a failure turned into one ``ConfigError`` line."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        raise ConfigError(format_error(e.errors()[0], model, prefix)) from None


def parse_json(model: type[BaseModel], text: str, what: str = "settings"):
    """A settings block from JSON text, or from a .json/.yaml file when ``text`` names one."""
    text = text.strip()
    if not text.startswith(("{", "[")) and Path(text).is_file():
        text = Path(text).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid JSON or YAML: {' '.join(str(e).split())}") from None
    return parse(model, raw or {}, prefix=what)


def _unwrap(annotation):
    """(the type inside Optional/Annotated, its discriminated members or None)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            args = typing.get_args(annotation)
            members = None
            for meta in args[1:]:
                if getattr(meta, "discriminator", None):
                    members = typing.get_args(args[0])
            if members:
                return args[0], members
            annotation = args[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, None
            annotation = args[0]
        else:
            return annotation, None


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], Any]:
    """Dotted path parts of a pydantic error location (discriminator tags dropped) and the type at its end."""
    parts, node = [], root
    items = list(loc)
    i = 0
    while i < len(items):
        item = items[i]
        node, members = _unwrap(node)
        if members:  # a discriminated union: the next location item is the tag
            node = next((m for m in members if item == typing.get_args(m.model_fields["kind"].annotation)[0]), None)
            i += 1
            continue
        if _is_model(node):
            parts.append(str(item))
            field = node.model_fields.get(str(item))
            node = field.annotation if field is not None else None
        elif typing.get_origin(node) is dict:
            parts.append(str(item))
            node = typing.get_args(node)[1]
        elif typing.get_origin(node) is list:
            parts.append(f"[{item}]")
            node = typing.get_args(node)[0]
        else:
            parts.append(str(item))
            node = None
        i += 1
    return parts, node


def _join(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[")


_EXPECTED = {"int_": "an integer", "float_": "a number", "bool_": "true or false", "string_": "a string",
             "dict_": "a mapping (key: value)", "model_": "a mapping (key: value)", "list_": "a list"}


def format_error(err: dict, root: type[BaseModel] = Config, prefix: str = "") -> str:
    """One line: the key, the bad value and what is allowed (from a pydantic error dict)."""
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    head = f"{prefix} error" if prefix else "config error"
    if kind == "extra_forbidden":
        parts, _ = _walk(root, loc[:-1])
        owner = _owner(root, loc[:-1])
        allowed = sorted(owner.model_fields) if owner is not None else []
        key = _join(parts + [str(loc[-1])])
        hint = f"allowed keys: {', '.join(allowed)}" if allowed else "no keys are allowed here"
        return f"{head}: unknown key '{key}'{_did_you_mean(str(loc[-1]), allowed)}; {hint}"
    parts, node = _walk(root, loc)
    where = _join(parts) or "<top level>"
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if kind == "missing":
        return f"{head}: '{_join(parts[:-1]) or prefix or '<top level>'}' is missing the required key '{parts[-1]}'"
    if kind in ("literal_error", "enum"):
        allowed = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{head}: '{where}' is {shown}; allowed values: {allowed}"
    if kind == "union_tag_invalid":
        return (f"{head}: '{where}.kind' is {json.dumps(err['ctx']['tag'])}; allowed values: "
                f"{err['ctx']['expected_tags'].replace(chr(39), '')}")
    if kind == "union_tag_not_found":
        return f"{head}: '{where}' is missing the required key 'kind' (rss, gsm8k, math or reasoning_gym)"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return f"{head}: '{where}': {msg}" if where != "<top level>" else f"{head}: {msg}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{head}: '{where}' is {shown}; {err['msg'][0].lower()}{err['msg'][1:]}"
    expected = next((text for prefix, text in _EXPECTED.items() if kind.startswith(prefix)), None)
    if expected:
        return f"{head}: '{where}' is {shown} ({type(value).__name__}); expected {expected}"
    return f"{head}: '{where}' = {shown}: {err['msg']}"


def _owner(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class at ``loc`` (the block an unknown key was found in)."""
    _, node = _walk(root, loc) if loc else ([], root)
    node, members = _unwrap(node)
    return node if _is_model(node) else None


def _resolve_field(model: type[BaseModel], path: list[str], where: str) -> None:
    """Raise ValueError unless ``path`` names a field inside ``model`` (sweep grid keys)."""
    node: Any = model
    for i, part in enumerate(path):
        node, _ = _unwrap(node)
        if _is_model(node):
            if part not in node.model_fields:
                raise ValueError(f"{where}: unknown key '{part}'{_did_you_mean(part, node.model_fields)}; allowed "
                                 f"keys: {', '.join(sorted(node.model_fields))}")
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            raise ValueError(f"{where}: '{'.'.join(path[:i])}' has no keys inside it")


def startup_checks(cfg: Config, base: str | Path = ".") -> None:
    """What can be checked before any job runs: local paths exist, and (``check_hub``) every hub model and
    dataset of the chosen experiments is cached or reachable. ``UserError`` (one line) otherwise."""
    from rlmeta.models.hub import check_hub_access, classify_source

    chosen = [cfg.experiments[n] for n in cfg.chosen()]
    hub: dict[tuple[str, str, str | None], str] = {}
    for name in sorted({e.dataset for e in chosen}):
        ds = cfg.datasets[name]
        if isinstance(ds, RSSDataset):
            for feed, url in ds.feeds.items():
                if not url.startswith(("http://", "https://")):
                    path = Path(base) / url.removeprefix("file://")
                    if not path.is_file():
                        raise UserError(f"datasets.{name}.feeds.{feed}: {url} is not a file (and not an http(s) URL)")
        elif isinstance(ds, ReasoningGymDataset):
            continue  # generated here: no files, nothing on the hub
        elif classify_source(ds.source, f"datasets.{name}.source", base) == "hub":
            hub.setdefault((ds.source, "dataset", None), f"datasets.{name}.source")
    for exp in chosen:
        m = cfg.models[exp.model]
        for key, source in (("hf", m.hf), ("mlx", m.mlx)):
            used = key == "hf" and (exp.backend == "torch" or not m.mlx) or key == "mlx" and exp.backend == "mlx"
            if source is None or not used:
                continue
            if classify_source(source, f"models.{exp.model}.{key}", base) == "hub":
                hub.setdefault((source, "model", m.revision), f"models.{exp.model}.{key}")
    if cfg.check_hub:
        for (repo, repo_type, revision), key in hub.items():
            check_hub_access(repo, key, repo_type, revision)


# -- the generated schema ------------------------------------------------------------------------

SCHEMA_HEADER = ("# Generated from src/rlmeta/settings.py by `rlmeta schema --write`: do not edit by hand.\n"
                 "# Every key of config/config.yaml and config/experiments/*.yaml, its type, default and meaning.\n")


def json_schema() -> dict:
    """The JSON schema of ``Config`` (what config/schema.yaml holds; pydantic's titles left out)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **strip(Config.model_json_schema())}


def schema_yaml() -> str:
    return SCHEMA_HEADER + yaml.safe_dump(json_schema(), sort_keys=False, width=110, allow_unicode=True)


def fields_help(model: type[BaseModel], prefix: str = "") -> list[str]:
    """``key (type, default): help`` lines of a settings model and its nested blocks (for --help epilogs)."""
    lines = []
    for name, field in model.model_fields.items():
        inner, _ = _unwrap(field.annotation)
        key = f"{prefix}{name}"
        if _is_model(inner):
            lines += fields_help(inner, key + ".")
            continue
        default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True),
                                                                    default=str)
        lines.append(f"  {key} ({default}): {field.description or ''}")
    return lines
