"""Explicit pyarrow schemas of every table the workflow writes.

These names are the contract between steps (see docs/data-flow.md).
"""
from __future__ import annotations

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")

HEADLINES = pa.schema(
    [
        pa.field("headline_id", pa.string(), nullable=False),  # stable hash of feed-independent key
        pa.field("feed", pa.string(), nullable=False),  # feed name from config
        pa.field("title", pa.string(), nullable=False),
        pa.field("link", pa.string()),
        pa.field("summary", pa.string()),
        pa.field("published", UTC_TS),  # entry's own time, null when absent
        pa.field("fetched_at", UTC_TS),  # from the snapshot's metadata, null for file feeds
    ]
)

PROBLEMS = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # gsm8k | math
        pa.field("split", pa.string(), nullable=False),  # train | test | support | query | heldout
        pa.field("subject", pa.string()),  # MATH subject slug, null for GSM8K
        pa.field("level", pa.int32()),  # MATH level 1-5, null when unknown
        pa.field("question", pa.string(), nullable=False),
        pa.field("solution", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
    ]
)

RG_PROBLEMS = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),  # reasoning_gym/<task>/<split>/<index>
        pa.field("source", pa.string(), nullable=False),  # reasoning_gym
        pa.field("split", pa.string(), nullable=False),  # train | test
        pa.field("task", pa.string(), nullable=False),  # the reasoning-gym generator (basic_arithmetic, ...)
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),  # the generator's gold answer
        pa.field("metadata", pa.string(), nullable=False),  # the entry's metadata, JSON (sorted keys)
        pa.field("config", pa.string(), nullable=False),  # the task's config parameters, JSON (sorted keys)
    ]
)
"""Problems drawn from reasoning-gym generators (``rlmeta prepare-reasoning-gym``)."""

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),  # headline_id or problem_id
        pa.field("task", pa.string(), nullable=False),  # the group key (headline, subject, ...)
        pa.field("split", pa.string(), nullable=False),  # train | eval
        pa.field("prompt", pa.list_(MESSAGE), nullable=False),  # chat messages
        pa.field("reference", pa.string()),  # gold answer, null when none
        pa.field("reference_completion", pa.string()),  # for warm-start SFT, null when none
    ]
)

RESPONSES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),  # base | trained
        pa.field("completion", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ]
)

REWARD_KEYS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("policy", pa.string(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),  # weighted total
]


def rewards_schema(components: list[str], metrics: list[str] = ()) -> pa.Schema:
    """Schema of a rewards table: keys, total, one float column per reward component (unweighted), then
    one per task metric (``accuracy/<name>``, ``format/<name>``)."""
    return pa.schema(REWARD_KEYS + [pa.field(c, pa.float64()) for c in [*components, *metrics]])


def is_metric_column(name: str) -> bool:
    """Task-metric columns of a rewards table carry a ``/`` (``accuracy/...``, ``format/...``)."""
    return "/" in name


TRAIN_METRICS_BASE = [
    ("step", pa.int64()),
    ("loss", pa.float64()),
    ("reward_mean", pa.float64()),
    ("reward_std", pa.float64()),
    ("kl", pa.float64()),
    ("clip_ratio", pa.float64()),
    ("grad_norm", pa.float64()),
    ("lr", pa.float64()),
    ("tokens", pa.int64()),
    ("step_seconds", pa.float64()),
    ("zero_std_frac", pa.float64()),  # fraction of groups whose rewards are all equal
    ("completion_len_mean", pa.float64()),
    ("param_norm", pa.float64()),  # L2 norm of all weights after the step (the divergence guard watches it)
    ("entropy", pa.float64()),  # mean per-token entropy (nats) of the policy over the sampled completion tokens
]


def train_metrics_schema(extra: list[str]) -> pa.Schema:
    """Schema of train_metrics: the common columns, then float columns such as ``reward/<name>``."""
    fields = [pa.field(n, t) for n, t in TRAIN_METRICS_BASE]
    fields += [pa.field(c, pa.float64()) for c in extra if c not in dict(TRAIN_METRICS_BASE)]
    return pa.schema(fields)


def eval_curve_schema(rewards: list[str], metrics: list[str] = ()) -> pa.Schema:
    """Schema of ``eval_curve.parquet``: one row per evaluation during training (``step`` in the units of the
    trainer's train_metrics rows, 0 = before the first update), the weighted reward mean, one unweighted mean
    per reward (``reward/<name>``), one mean per task metric of the template (``accuracy/...``, ``format/...``),
    then completion length (tokens) and the fraction that hit ``max_new_tokens``."""
    fields = [pa.field("step", pa.int64(), nullable=False), pa.field("seconds", pa.float64()),
              pa.field("n_prompts", pa.int32(), nullable=False), pa.field("reward", pa.float64())]
    fields += [pa.field(f"reward/{r}", pa.float64()) for r in rewards]
    fields += [pa.field(m, pa.float64()) for m in metrics]
    fields += [pa.field("completion_len_mean", pa.float64()), pa.field("truncated_frac", pa.float64())]
    return pa.schema(fields)


ROLLOUT_KEYS = [
    pa.field("step", pa.int32(), nullable=False),  # the trainer's step when it was sampled (updates done before it)
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("group", pa.int32(), nullable=False),  # index of the prompt's group in the rollout batch
    pa.field("sample_idx", pa.int32(), nullable=False),  # index in the group
    pa.field("completion", pa.string(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),  # weighted total
]


def rollouts_schema(rewards: list[str]) -> pa.Schema:
    """Schema of a rollouts table (``rollouts/steps-<first>-<last>.parquet``): every training completion with
    its rewards (``reward/<name>`` unweighted), the advantage the loss used, its length in tokens and whether
    it hit ``max_new_tokens`` without a stop token."""
    return pa.schema(ROLLOUT_KEYS + [pa.field(f"reward/{r}", pa.float64()) for r in rewards] + [
        pa.field("advantage", pa.float64(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ])
