"""GRPO / GSPO on torch with TRL's ``GRPOTrainer`` (LoRA through peft), in the project's formats.

``grpo_config_kwargs`` maps an ``RLJob`` onto ``trl.GRPOConfig``; ``reward_functions`` turns its
rewards into TRL reward functions over the one scoring path (``rlmeta.rewards.RewardSpec.score``);
``TrainMetricsCallback`` collects TRL's logs as the project's ``train_metrics`` rows;
``Trainer`` (a ``GRPOTrainer``) writes each checkpoint aside and renames it in with its marker, the
metrics and evaluation rows so far, keeps every training completion (``rlmeta.rl.evidence.RolloutLog``),
draws prompts by learning potential when UED is on (PLR, the same ``UEDSampler`` as the MLX
trainer) and runs DAPO's dynamic sampling (``merge_groups``); ``EvalCallback`` evaluates the policy on
held-out prompts during training
(``rlmeta.rl.evidence.EvalCurve``, the MLX trainer's evaluation); ``train_trl`` runs it all and saves
``<out_dir>/final``.
One TRL optimizer step is one row of train_metrics; a rollout batch gives ``updates_per_batch`` of them.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlmeta import checkpoints
from rlmeta.io import write_json
from rlmeta.preempt import Preemption
from rlmeta.rl import dapo
from rlmeta.rl.evidence import CHUNKS_DIR, EvalCurve, RolloutLog, eval_line, rollout_records
from rlmeta.schedules import transformers_name
from rlmeta.settings import DistributedSettings, LoraSettings, RLJob, VLLMSettings, WandbSettings
from rlmeta.tracking import METRICS_FILE, DivergenceGuard, MetricsTable, log_eval, wandb_run

log = logging.getLogger(__name__)

UED_FILE = "ued_sampler.json"
GUARD_FILE = "divergence_guard.json"
# TRL log key -> train_metrics column; the GENERATION ones are logged only on steps that sample.
METRIC_KEYS = {
    "loss": "loss", "reward": "reward_mean", "reward_std": "reward_std", "kl": "kl",
    "clip_ratio/region_mean": "clip_ratio", "grad_norm": "grad_norm", "learning_rate": "lr",
    "num_tokens": "tokens", "frac_reward_zero_std": "zero_std_frac", "completions/mean_length": "completion_len_mean",
    "entropy": "entropy",
}
GENERATION_KEYS = ("reward", "reward_std", "num_tokens", "frac_reward_zero_std", "completions/mean_length",
                   dapo.EXTRA_BATCHES, dapo.GROUPS_KEPT)
DYNAMIC_KEYS = {dapo.EXTRA_BATCHES: dapo.EXTRA_BATCHES, dapo.GROUPS_KEPT: dapo.GROUPS_KEPT}
"""Dynamic sampling's counts: logged by ``Trainer`` under the train_metrics column names."""
# rollout-batch tensors of GRPOTrainer's output that dynamic sampling knows how to select rows of, with the
# padding side and value (None: the tokenizer's pad id) of each 2-D one; any other key (images) stops the run
MERGED_KEYS = {"prompt_ids": ("left", None), "prompt_mask": ("left", 0), "completion_ids": ("right", None),
               "completion_mask": ("right", 0), "old_per_token_logps": ("right", 0.0),
               "ref_per_token_logps": ("right", 0.0), "sampling_per_token_logps": ("right", 0.0),
               "importance_sampling_ratio": ("right", 0.0), "tool_mask": ("right", 1), "advantages": (None, None)}


def grpo_config(job: RLJob, out_dir: str | os.PathLike, seed: int = 0, report_to: str | None = None,
                run_name: str | None = None):
    """``trl.GRPOConfig`` for a job on this machine (see ``grpo_config_kwargs``)."""
    from trl import GRPOConfig

    return GRPOConfig(**grpo_config_kwargs(job, out_dir, seed, report_to, None, run_name))


def world_size(env=None) -> int:
    """Processes of this training run: torchrun's ``WORLD_SIZE`` (1 outside torchrun)."""
    return int((os.environ if env is None else env).get("WORLD_SIZE", "1"))


def grpo_config_kwargs(job: RLJob, out_dir: str | os.PathLike, seed: int = 0, report_to: str | None = None,
                       cuda: bool | None = None, run_name: str | None = None, world: int | None = None) -> dict:
    """``trl.GRPOConfig`` keyword arguments for a job.

    One generation batch = ``batch_prompts`` prompts x ``group_size`` completions over all ``world``
    processes (default: ``WORLD_SIZE``), each training its equal share in one micro-batch
    (``per_device_train_batch_size``, ``steps_per_generation=1``), reused for ``updates_per_batch`` optimizer
    steps (``num_iterations``); ``max_steps = steps x updates_per_batch``: the global batch is the same for
    any process count. gspo sets ``importance_sampling_level="sequence"``; null epsilons come from the
    algorithm's defaults. CPU (``use_cpu``, fp32) when no CUDA GPU; bf16 autocast on CUDA unless ``trl.bf16``
    is false. ``train.distributed.strategy`` adds transformers' FSDP2 or DeepSpeed ZeRO-3 arguments
    (``distributed_kwargs``).
    """
    import torch

    t = job.train
    cuda = torch.cuda.is_available() if cuda is None else cuda
    world = world_size() if world is None else world
    if world != t.distributed.nproc:
        log.warning("running %d processes, train.distributed.nproc is %d: the global batch stays %d x %d", world,
                    t.distributed.nproc, t.batch_prompts, t.group_size)
    if (t.batch_prompts * t.group_size) % world:
        raise SystemExit(f"rlmeta train-trl: {world} processes cannot share the global batch batch_prompts x "
                         f"group_size = {t.batch_prompts * t.group_size} equally; set train.distributed.nproc to a "
                         "divisor of it")
    checkpointing = cuda if t.gradient_checkpointing is None else t.gradient_checkpointing
    eps_low, eps_high = job.epsilons
    mu = t.updates_per_batch
    report_to = report_to or t.trl.report_to
    schedule, schedule_kwargs = transformers_name(t.lr_schedule)
    return dict(
        output_dir=str(out_dir),
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        full_determinism=t.trl.deterministic,  # Trainer then calls enable_full_determinism(seed)
        use_cpu=not cuda,
        bf16=bool(cuda) if t.trl.bf16 is None else t.trl.bf16,
        # memory for compute (pointless on the CPU); FSDP checkpoints inside its own wrapping instead
        activation_checkpointing=bool(checkpointing) and t.distributed.strategy != "fsdp",
        max_steps=t.steps * mu,
        num_iterations=mu,
        num_generations=t.group_size,
        per_device_train_batch_size=t.batch_prompts * t.group_size // world,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs=schedule_kwargs or None,
        warmup_steps=t.warmup_steps * mu,
        weight_decay=t.weight_decay,
        max_grad_norm=math.inf if t.max_grad_norm is None else t.max_grad_norm,  # inf: log, never clip
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k,
        min_p=t.min_p or None,  # TRL: None = off
        repetition_penalty=t.repetition_penalty,
        max_completion_length=t.max_new_tokens,
        chat_template_kwargs=dict(t.chat_template_kwargs),  # TRL applies the template to the prompts itself
        importance_sampling_level="sequence" if job.algorithm == "gspo" else "token",
        epsilon=eps_low,
        epsilon_high=eps_high,
        beta=t.beta,
        scale_rewards=t.scale_rewards,
        loss_type=t.loss_type,
        # the overlong penalty (DAPO eq. 13) is the last reward function (see reward_functions), weighted here
        reward_weights=[float(w) for w in job.rewards.values()]
        + ([float(t.overlong_penalty)] if t.overlong_buffer is not None else []),
        mask_truncated_completions=t.mask_truncated,  # DAPO's overlong filtering
        **vllm_kwargs(t.trl.vllm, cuda),
        report_to="none" if report_to == "none" else [report_to],
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence guard, not be averaged away
        save_strategy="steps",
        save_steps=t.checkpoint_every * mu,
        ignore_data_skip=t.ued.enabled,  # the UED sampler resumes from its saved state, not by replaying draws
        **distributed_kwargs(t.distributed, cuda, bool(checkpointing)),
        **t.trl.extra,  # any other GRPOConfig field (rlmeta.rl.trl_fields: never one of those above)
    )


def distributed_kwargs(d: DistributedSettings, cuda: bool, checkpointing: bool) -> dict:
    """transformers ``TrainingArguments`` for ``train.distributed.strategy``; accelerate builds its plugin from them.

    ddp needs nothing (torchrun's environment makes accelerate wrap the model in DistributedDataParallel, gloo on
    the CPU, NCCL on GPUs). fsdp: FSDP2 (``fsdp_config.version`` 2) with full-state-dict checkpoints (whole
    weights; a resume still needs the same layout, ``_resume_checkpoint``), each decoder layer its own unit
    (transformers' default ``TRANSFORMER_BASED_WRAP`` from the model's ``_no_split_modules``), weights loaded on
    rank 0 and broadcast.
    zero3: DeepSpeed ZeRO stage 3 with ``"auto"`` values that transformers fills from these arguments, and
    16-bit weights gathered at save time so that checkpoints load anywhere. Both need CUDA (SystemExit otherwise).
    """
    if d.strategy == "ddp":
        return {}
    if not cuda:
        raise SystemExit(f"rlmeta train-trl: train.distributed.strategy {d.strategy} needs CUDA GPUs (this machine "
                         "has none); use strategy: ddp on the CPU")
    if d.strategy == "fsdp":
        return dict(fsdp=True, fsdp_config={
            "version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": True, "activation_checkpointing": checkpointing,
            "cpu_offload": d.cpu_offload})
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("rlmeta train-trl: train.distributed.strategy zero3 needs deepspeed: pip install "
                         "'rlmeta[deepspeed]' (Linux with CUDA)")
    return dict(deepspeed=zero3_config(d.cpu_offload))


def vllm_kwargs(v: VLLMSettings | None, cuda: bool) -> dict:
    """TRL's vLLM arguments for ``train.trl.vllm`` (SystemExit without CUDA or without vllm installed).

    Server mode talks to the ``trl vllm-serve`` that ``rlmeta launch --vllm-serve-gpus`` started on this node."""
    if v is None:
        return dict(use_vllm=False)
    if not cuda:
        raise SystemExit("rlmeta train-trl: train.trl.vllm needs CUDA GPUs (vLLM generates on them; this machine has "
                         "none); drop train.trl.vllm to generate with transformers")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("rlmeta train-trl: train.trl.vllm needs vllm: pip install 'rlmeta[vllm]' (Linux with CUDA)")
    kw = dict(use_vllm=True, vllm_mode=v.mode, vllm_gpu_memory_utilization=v.gpu_memory_utilization,
              vllm_tensor_parallel_size=v.tensor_parallel_size, vllm_max_model_length=v.max_model_length,
              vllm_enable_sleep_mode=v.enable_sleep_mode)
    if v.mode == "server":
        kw.update(vllm_server_host="127.0.0.1", vllm_server_port=v.port)
    return kw


def zero3_config(cpu_offload: bool = False) -> dict:
    """The DeepSpeed ZeRO-3 config (a dict; transformers fills the ``"auto"`` values from its arguments)."""
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True}
    if cpu_offload:
        zero["offload_param"] = zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto"}


def lora_config(lora: LoraSettings | None):
    """``peft.LoraConfig`` for a ``train.lora`` block (None = full fine-tuning)."""
    if lora is None:
        return None
    from rlmeta.policy.lora import peft_config

    return peft_config(lora)


def _text(completion) -> str:
    """A TRL completion (plain text, or conversational [{role, content}]) as text."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion)
    return completion


def reward_functions(job: RLJob) -> list:
    """One TRL reward function per reward, named after it (TRL logs ``rewards/<name>/mean``).

    Each scores the batch through the reward's own ``RewardSpec.score`` (the same path as the
    score step and the MLX trainer), reading the ``reference`` dataset column. Weights are not
    applied here: they go to ``GRPOConfig.reward_weights``. With ``train.overlong_buffer`` the last one is
    ``overlong`` (``rlmeta.rl.dapo.overlong_penalty`` of the completion lengths, weight ``train.overlong_penalty``).
    """
    from rlmeta.rewards import REGISTRY

    funcs = []
    for name in job.rewards:
        spec, params = REGISTRY[name], job.reward_params.get(name)

        # TRL's reward-function interface passes every dataset column and its own helpers as keywords
        def fn(prompts, completions, reference=None, _spec=spec, _params=params, **trl_kwargs):
            refs = reference if reference is not None else [None] * len(completions)
            return _spec.score([_text(c) for c in completions], refs, prompts, _params).tolist()

        fn.__name__ = fn.__qualname__ = name
        funcs.append(fn)
    if job.train.overlong_buffer is not None:  # DAPO's soft overlong punishment, on the completion_ids TRL passes
        funcs.append(dapo.overlong_reward_function(job.train.max_new_tokens, job.train.overlong_buffer))
    return funcs


def train_dataset(prompts_path: str | os.PathLike, max_prompts: int | None = None):
    """``datasets.Dataset`` of the train split: ``prompt`` (chat messages), ``reference``, ``prompt_index``,
    ``prompt_id``."""
    from datasets import Dataset

    from rlmeta.prompts import train_rows

    rows = train_rows(prompts_path, max_prompts)
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "reference": [r["reference"] for r in rows],
                              "prompt_index": list(range(len(rows))), "prompt_id": [r["prompt_id"] for r in rows]})


class UEDRepeatSampler:
    """Prompt indices for TRL drawn by a ``UEDSampler``, in TRL's ``RepeatSampler`` layout: each batch of
    ``k`` distinct prompts, each prompt ``group_size`` times, the batch ``repeat`` times (one per update).

    The data loader draws a batch ahead of training, so a drawn batch waits in ``pending`` until its
    rewards come back (``feedback``); a resumed run re-yields the pending batches first, which makes
    the sequence of draws the same as without the interruption. Iteration never ends: the trainer
    counts steps.
    """

    def __init__(self, ued, k: int, group_size: int, repeat: int, n_prompts: int):
        self.ued, self.k, self.group_size, self.repeat = ued, k, group_size, repeat
        self.n_prompts = n_prompts
        self.pending: deque[list[int]] = deque()

    def __len__(self) -> int:  # one pass over the prompts, for the Trainer's epoch bookkeeping
        return -(-self.n_prompts // self.k) * self.k * self.group_size * self.repeat

    def __iter__(self):
        replay = list(self.pending)  # drawn before an interruption (or by the previous pass), not scored yet
        while True:
            if replay:
                idx = replay.pop(0)
            else:
                idx = self.ued.sample(self.k)
                self.pending.append(idx)
            for _ in range(self.repeat):
                for i in idx:
                    yield from [i] * self.group_size

    def feedback(self, indices, totals) -> None:
        """Rewards of the oldest pending batch: ``indices`` (prompt index per completion) and ``totals``."""
        batch = self.pending.popleft()
        by_prompt = {i: [] for i in batch}
        for i, r in zip(indices, totals):
            by_prompt[int(i)].append(float(r))
        self.ued.update(batch, [by_prompt[i] for i in batch])

    def state_dict(self) -> dict:
        return {"ued": self.ued.state_dict(), "pending": [list(b) for b in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.ued.load_state_dict(state["ued"])
        self.pending = deque(list(b) for b in state["pending"])


class Trainer(GRPOTrainer):
    """TRL's GRPOTrainer with whole-or-absent checkpoints (and the metrics inside them) and UED sampling."""

    def __init__(self, *args, metrics: MetricsTable, guard: DivergenceGuard, spec: dict,
                 ued: UEDRepeatSampler | None = None, curve: EvalCurve | None = None,
                 rollouts: RolloutLog | None = None, dynamic_sampling: int = 0, **kwargs):
        self.rlmeta_metrics, self.rlmeta_guard, self.rlmeta_spec, self.ued = metrics, guard, spec, ued
        self.rlmeta_curve, self.rlmeta_rollouts = curve, rollouts
        self.rlmeta_dynamic = dynamic_sampling  # extra rollout batches a step may draw (DAPO; 0 = off)
        self._extra_draw = False  # inside one of dynamic sampling's extra draws: no UED feedback
        self.rlmeta_run = None  # the W&B run, when reporting to W&B (rollout tables go to it)
        self._last_rewards = None
        self._last_completion_ids = None
        self._staging: Path | None = None
        self._rng_checkpoint: str | None = None
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        return self.ued if self.ued is not None else super()._get_train_sampler(dataset)

    def _load_rng_state(self, checkpoint):
        # With UED (ignore_data_skip) transformers restores the RNG before it creates the data loader's
        # iterator, which draws from torch's RNG: the resumed run would sample other completions than an
        # uninterrupted one. Restore it once the first batch is fetched instead, as a data-skipping resume does.
        if self.ued is not None and checkpoint is not None:
            self._rng_checkpoint = checkpoint
            return
        super()._load_rng_state(checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        out = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._rng_checkpoint is not None:
            checkpoint, self._rng_checkpoint = self._rng_checkpoint, None
            super()._load_rng_state(checkpoint)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.ued is not None and self.model.training and not self._extra_draw:
            from accelerate.utils import gather_object

            totals = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            indices = gather_object([x["prompt_index"] for x in inputs])
            self.ued.feedback(indices, totals.cpu().numpy())
        self._last_rewards = rewards_per_func  # gathered over processes, for the rollouts table
        self._last_completion_ids = completion_ids_list  # this process's, unpadded (the mask may hide truncated ones)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.rlmeta_dynamic and self.model.training:
            inputs, out = self._dynamic_sampling(inputs, out)
        if self.rlmeta_rollouts is not None and self.rlmeta_rollouts.enabled and self.model.training:
            self._record_rollouts(inputs, out)
        return out

    def _dynamic_sampling(self, inputs, out):
        """DAPO's dynamic sampling, as the MLX trainer's (``dapo.DynamicBatch``): this process's groups whose
        total rewards are all equal are dropped and further batches of prompts are drawn, up to
        ``rlmeta_dynamic`` extra ones, until it holds as many groups with a spread as it was given; the step
        trains on those (fewer when the budget runs out, the first batch when none had a spread).

        Every process has whole groups (the config check) and draws as long as any process still needs groups
        (one all-reduce per draw: generation under FSDP/ZeRO-3 is collective). Extra prompts are drawn uniformly
        without replacement from those this process has not drawn in the step (all, when too few are left), seeded
        by (seed, step, draw, rank): a resumed run draws the same ones; UED's sampler
        is told only about the step's own batch. The reward metrics TRL logged for the draws are replaced by those
        of the rows trained on; lengths and token counts stay those of every draw."""
        import torch
        from accelerate.utils import gather_object

        from rlmeta.policy.base import derive_seed

        g, acc = self.num_generations, self.accelerator
        unknown = sorted(k for k, v in out.items() if v is not None and k not in MERGED_KEYS
                         and k != "num_items_in_batch")
        if unknown:
            raise SystemExit(f"rlmeta train-trl: train.dynamic_sampling cannot select rows of {unknown} "
                             "(multimodal inputs); set train.dynamic_sampling: 0")
        local = slice(acc.process_index * len(inputs), (acc.process_index + 1) * len(inputs))
        weights = self.reward_weights.to(self._last_rewards.device)
        draws = [(inputs, out, self._last_rewards[local], self._last_completion_ids)]
        kept = dapo.DynamicBatch(len(inputs) // g)
        kept.add(dapo.has_spread((draws[0][2] * weights).nansum(dim=1).cpu().numpy(), g))
        # the reward metrics' lengths before this step: the first draw appended one value to each
        n_metrics = {k: len(v) - 1 for k, v in self._metrics["train"].items()
                     if k in ("reward", "reward_std", "frac_reward_zero_std") or k.startswith("rewards/")}
        while len(draws) <= self.rlmeta_dynamic:
            short = acc.gather(torch.tensor([0 if kept.full else 1], device=acc.device)).sum().item()
            if not short:
                break
            rng = np.random.default_rng(
                derive_seed(self.args.seed, "dynamic", self.state.global_step, len(draws), acc.process_index))
            drawn = {int(x["prompt_index"]) for d in draws for x in d[0]}
            fresh = [i for i in range(len(self.train_dataset)) if i not in drawn]  # this step's unseen prompts
            pool = fresh if len(fresh) >= len(inputs) // g else list(range(len(self.train_dataset)))
            prompts = rng.choice(pool, size=len(inputs) // g, replace=False)
            extra = [dict(self.train_dataset[int(i)]) for i in prompts for _ in range(g)]
            self._extra_draw = True
            try:
                o = super()._generate_and_score_completions(extra)
            finally:
                self._extra_draw = False
            draws.append((extra, o, self._last_rewards[local], self._last_completion_ids))
            kept.add(dapo.has_spread((draws[-1][2] * weights).nansum(dim=1).cpu().numpy(), g))
        rows = [(b, j * g + i) for b, j in kept.selection() for i in range(g)]
        merged = merge_groups([d[1] for d in draws], rows, self.processing_class.pad_token_id)
        mask = merged["completion_mask"] if merged.get("tool_mask") is None else \
            merged["completion_mask"] * merged["tool_mask"]
        merged["num_items_in_batch"] = acc.gather(mask.sum()).sum()
        inputs = [draws[b][0][r] for b, r in rows]
        self._last_completion_ids = [draws[b][3][r] for b, r in rows]
        per_func = torch.stack([draws[b][2][r] for b, r in rows])
        # every process's selected rows (their counts may differ): the rollouts table and the logged rewards
        self._last_rewards = torch.tensor(gather_object(per_func.cpu().tolist()), dtype=per_func.dtype)
        m = self._metrics["train"]
        for k, n in n_metrics.items():  # TRL appended one value per draw: keep the values from before the step
            del m[k][n:]
        totals = (self._last_rewards * weights.cpu()).nansum(dim=1)
        m["reward"].append(totals.mean().item())
        m["reward_std"].append(totals.std().item() if totals.numel() > 1 else 0.0)
        m["frac_reward_zero_std"].append(float((~dapo.has_spread(totals.numpy(), g)).mean()))
        for i, name in enumerate(self.reward_func_names):
            m[f"rewards/{name}/mean"].append(torch.nanmean(self._last_rewards[:, i]).item())
            m[f"rewards/{name}/std"].append(self._last_rewards[:, i].std().item() if totals.numel() > 1 else 0.0)
        m[dapo.EXTRA_BATCHES].append(float(len(draws) - 1))
        m[dapo.GROUPS_KEPT].append(float(sum(gather_object([len(kept.kept)]))))
        return inputs, merged

    def _record_rollouts(self, inputs, out) -> None:
        """The batch TRL just sampled and scored, as rollouts rows (every process's part, gathered)."""
        from accelerate.utils import gather_object

        # from the unpadded ids, not completion_mask: mask_truncated_completions zeroes the truncated rows' masks
        rows = [list(ids) for ids in self._last_completion_ids]
        lengths = [len(r) for r in rows]
        stops = {*self.eos_token_ids, self.processing_class.pad_token_id}
        texts = gather_object(self.processing_class.batch_decode(rows, skip_special_tokens=True))
        truncated = gather_object([not r or r[-1] not in stops for r in rows])
        prompt_ids = gather_object([x["prompt_id"] for x in inputs])
        n_tokens = gather_object(lengths)
        # gather_object: with dynamic sampling the processes may keep different numbers of rows
        adv = np.array(gather_object(out["advantages"].float().cpu().tolist()))
        per_func = self._last_rewards.float().cpu().numpy()
        weights = self.reward_weights.float().cpu().numpy()
        g = self.num_generations
        k = range(len(texts))
        self.rlmeta_rollouts.add(rollout_records(
            self.state.global_step, prompt_ids, [i // g for i in k], [i % g for i in k], texts,
            (per_func * weights).sum(axis=1), {n: per_func[:, j] for j, n in enumerate(self.reward_func_names)},
            adv, n_tokens, truncated))

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write ``checkpoint-N`` in a staging folder, add the metrics rows, UED state and the marker, then
        rename it into place: a checkpoint is whole or absent."""
        out = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        if self.rlmeta_rollouts is not None and self.args.should_save:  # before the checkpoint: see RolloutLog
            self.rlmeta_rollouts.checkpoint(self.rlmeta_run, self.state.global_step, step_key="train/global_step")
        self._staging = out / f".staging-{name}"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging, staging = None, self._staging
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        self.rlmeta_guard.record_checkpoint(self.state.global_step, out / name)  # on every rank
        if self.args.should_save:
            folder = staging / name
            write_json(folder / GUARD_FILE, self.rlmeta_guard.state())
            self.rlmeta_metrics.write(folder / METRICS_FILE)
            if self.rlmeta_curve is not None:
                self.rlmeta_curve.save(folder)
            if self.ued is not None:
                write_json(folder / UED_FILE, self.ued.state_dict())
            checkpoints.write_marker(folder, step=self.state.global_step, spec=self.rlmeta_spec, backend="torch",
                                     world_size=self.accelerator.num_processes)
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(folder, out / name)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def merge_groups(outs: list[dict], rows: list[tuple[int, int]], pad_id: int) -> dict:
    """The rows ``(draw, row)`` of several ``GRPOTrainer`` rollout batches as one batch: each 2-D tensor padded
    to the widest draw (prompts on the left, completions on the right, as TRL pads them; the padding is masked),
    advantages concatenated. ``num_items_in_batch`` is the caller's (it is gathered over processes)."""
    import torch

    merged: dict = {}
    for key, (side, value) in MERGED_KEYS.items():
        parts = [o.get(key) for o in outs]
        if all(p is None for p in parts):
            continue
        if side is None:
            merged[key] = torch.stack([parts[b][r] for b, r in rows])
            continue
        width = max(p.shape[1] for p in parts)
        fill = pad_id if value is None else value
        padded = []
        for p in parts:
            extra = p.new_full((p.shape[0], width - p.shape[1]), fill)
            padded.append(torch.cat([extra, p] if side == "left" else [p, extra], dim=1))
        merged[key] = torch.stack([padded[b][r] for b, r in rows])
    return merged


class EvalCallback(TrainerCallback):
    """Evaluations during training (``EvalCurve``): before the first step (unless resumed), every
    ``eval_every x updates_per_batch`` optimizer steps and after the last, on the model being trained (its
    LoRA adapters active), through ``TorchPolicy``'s sampler; each row goes to stderr and W&B (``eval/...``)."""

    def __init__(self, curve: EvalCurve, model_dir, trainer_ref: list):
        self.curve, self.model_dir, self.trainer_ref = curve, model_dir, trainer_ref

    def _evaluate(self, state, model):
        if model is None or not self.curve.due(state.global_step):
            return
        from rlmeta.policy.torch_policy import TorchPolicy

        trainer = self.trainer_ref[0]
        # DDP: rank 0 evaluates its full replica while the others wait at the next all-reduce; a sharded model
        # (fsdp, zero3) needs every rank in each forward, so all evaluate the same greedy prompts
        if not state.is_world_process_zero and trainer.rlmeta_spec["job"]["train"]["distributed"]["strategy"] == "ddp":
            return
        policy = TorchPolicy(trainer.accelerator.unwrap_model(model), trainer.processing_class, source=self.model_dir)
        row = self.curve.evaluate(policy, state.global_step)
        if state.is_world_process_zero:
            log_eval(trainer.rlmeta_run, row, state.global_step, step_key="train/global_step")
            print(eval_line(row), file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._evaluate(state, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self._evaluate(state, model)


class PreemptCallback(TrainerCallback):
    """On the pre-timeout signal (``rlmeta.preempt``), agreed on by every rank at the end of a step: save a
    checkpoint of that step and stop training (``train_trl`` then exits for a requeue)."""

    def __init__(self, preemption):
        self.preemption = preemption

    def on_step_end(self, args, state, control, **kw):
        if self.preemption.agreed() and state.global_step < state.max_steps:  # the last step finishes the run
            self.preemption.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True


class TrainMetricsCallback(TrainerCallback):
    """Collects each logged optimizer step as a train_metrics row, prints it to stderr, and runs the
    divergence guard on it (which stops the run on NaN/inf or divergence).

    TRL logs sampling metrics (reward, lengths, tokens) only on steps that generate; steps that
    reuse the batch (``num_iterations`` > 1) carry them forward. ``tokens`` is TRL's cumulative
    ``num_tokens`` (prompt + completion tokens so far). ``kl`` is null when beta = 0. ``param_norm``
    is the L2 norm of all weights after the step.
    """

    def __init__(self, metrics: MetricsTable, reward_names: list[str], guard: DivergenceGuard,
                 dynamic: bool = False):
        self.metrics, self.guard = metrics, guard
        self.keys = {**METRIC_KEYS, **{f"rewards/{n}/mean": f"reward/{n}" for n in reward_names},
                     **(DYNAMIC_KEYS if dynamic else {})}
        self.carry: dict = {}
        self.t0, self.step_seconds, self.param_norm = None, None, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        if model is not None:  # the weights' norm before the first update (a resumed run keeps its own)
            self.guard.begin(param_norm(model))

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.step_seconds = time.perf_counter() - self.t0 if self.t0 is not None else None
        if model is not None:
            self.param_norm = param_norm(model)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs or "train_runtime" in logs:
            return
        gen = [k for k in GENERATION_KEYS if k in logs] + [k for k in logs if k.startswith("rewards/")]
        self.carry.update({k: logs[k] for k in gen})
        merged = {**self.carry, **logs}
        row = {col: merged.get(key) for key, col in self.keys.items()}
        row["tokens"] = int(row["tokens"]) if row["tokens"] is not None else None
        row.update(step=state.global_step, step_seconds=self.step_seconds, param_norm=self.param_norm)
        self.metrics.add(row)
        if state.is_world_process_zero:  # every rank logs the same (gathered) values: print once
            print(f"step {state.global_step}/{state.max_steps} loss={_fmt(row['loss'])} "
                  f"reward={_fmt(row['reward_mean'])} kl={_fmt(row['kl'])} grad_norm={_fmt(row['grad_norm'])} "
                  f"len={_fmt(row['completion_len_mean'])} {_fmt(row['step_seconds'])}s", file=sys.stderr, flush=True)
        self.guard.check(state.global_step, row, self.param_norm)


def param_norm(model) -> float:
    """L2 norm of all weights of a torch model (frozen ones included); NaN or inf as soon as one weight is."""
    import torch

    with torch.no_grad():
        # float64: huge but finite weights (1e30) must give a finite norm, not overflow float32's sum of squares
        return float(torch.stack([p.detach().double().pow(2).sum() for p in model.parameters()]).sum().sqrt())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _without_distributed(spec: dict) -> dict:
    job = spec["job"]
    return {**spec, "job": {**job, "train": {k: v for k, v in job["train"].items() if k != "distributed"}}}


def _resume_checkpoint(out_dir: Path, spec: dict, world: int = 1) -> str | None:
    """The latest complete ``checkpoint-N`` trained with the same spec; checkpoints of another spec are removed.

    ``train.distributed`` may differ: the global batch does not depend on it. Under ddp every checkpoint holds
    the full weights and optimizer state, so another process count resumes (the sampling streams then differ
    from an uninterrupted run's: each rank draws from its own saved RNG state, missing ranks start from the
    seed). fsdp and zero3 resume only with the strategy and process count that wrote the checkpoint
    (SystemExit otherwise): ZeRO-3 keeps one optimizer partition per rank.
    """
    last = checkpoints.latest(out_dir)
    if last is None:
        return None
    marker = checkpoints.marker(last)
    if _without_distributed(marker.get("spec") or {"job": {"train": {}}}) != _without_distributed(spec):
        checkpoints.remove_all(out_dir, "trained with a different spec")
        return None
    then, now = marker["spec"]["job"]["train"].get("distributed", {}), spec["job"]["train"]["distributed"]
    then_world = int(marker.get("world_size", 1))
    if then.get("strategy", "ddp") != now["strategy"] or (then_world != world and now["strategy"] != "ddp"):
        raise SystemExit(f"rlmeta train-trl: {last} was written by {then_world} process(es) with strategy "
                         f"{then.get('strategy', 'ddp')}; resume it with those (train.distributed), or delete "
                         f"{out_dir} to start again (only ddp resumes with another process count)")
    if then_world != world:
        log.warning("resuming %s (written by %d processes) with %d: same global batch and optimizer state, "
                    "other sampling streams than an uninterrupted run", last, then_world, world)
    return str(last)


def train_trl(model_dir: str | os.PathLike, prompts_path: str | os.PathLike, job: RLJob,
              out_dir: str | os.PathLike, metrics_path: str | os.PathLike, wandb: WandbSettings | None = None,
              seed: int = 0, *, callbacks: list | None = None, curve_path: str | os.PathLike | None = None,
              rollouts_path: str | os.PathLike | None = None) -> Path:
    """Train ``model_dir`` with TRL GRPO/GSPO on the train prompts; return ``<out_dir>/final``.

    ``curve_path`` (eval_curve parquet) and ``rollouts_path`` (rollouts folder) are written when training
    ends (not when None); see ``rlmeta.rl.evidence``.

    Checkpoints go to ``<out_dir>/checkpoint-N`` every ``checkpoint_every`` rollout batches and a
    rerun resumes from the latest complete one trained with the same spec, with every step's metrics.
    ``callbacks``: extra ``TrainerCallback``s (e.g. a benchmark's clock).
    """
    import json

    out_dir = Path(out_dir)
    wandb = wandb or WandbSettings()
    dataset = train_dataset(prompts_path, job.max_train_prompts)
    t = job.train
    if t.ued.enabled and t.batch_prompts > len(dataset):
        log.warning("UED draws distinct prompts: batch_prompts %d capped at the %d train prompts", t.batch_prompts,
                    len(dataset))
        t = t.model_copy(update={"batch_prompts": len(dataset)})
        job = job.model_copy(update={"train": t})
    report_to = t.trl.report_to
    if report_to == "wandb" and wandb.mode == "disabled":
        report_to = "none"
    name = checkpoints.run_name(out_dir)
    args = grpo_config(job, out_dir, seed, report_to=report_to, run_name=name)
    spec = json.loads(json.dumps({"model": str(model_dir), "seed": seed, "job": job.model_dump(mode="json"),
                                  "inputs": checkpoints.inputs_fingerprint(model_dir, prompts_path)},
                                 sort_keys=True))
    resume = _resume_checkpoint(out_dir, spec, world_size())
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_step = int(re.search(r"checkpoint-(\d+)$", resume).group(1)) if resume else None
    metrics = MetricsTable(dapo.metric_columns(job))
    if resume:
        metrics.restore(resume, resume_step)
    guard = DivergenceGuard(t.guard, job.reward_floor, "train.guard", checkpoints.weights_finite)
    if resume:
        guard.restore(json.loads((Path(resume) / GUARD_FILE).read_text()))
    # TRL logs rewards/<name>/mean per reward function: the overlong penalty's becomes reward/overlong
    callback = TrainMetricsCallback(metrics, list(job.rewards) + (["overlong"] if t.overlong_buffer is not None
                                                                   else []), guard, bool(t.dynamic_sampling))
    curve = EvalCurve(prompts_path, job, seed, args.max_steps, unit=t.updates_per_batch)
    rollouts = RolloutLog(list(job.rewards), out_dir / CHUNKS_DIR, enabled=t.log_rollouts)
    if resume:
        curve.restore(resume, resume_step)
    rollouts.restore(resume_step or 0)  # rows of the steps a resumed run samples again are dropped
    outputs = (curve, curve_path, rollouts, rollouts_path)
    log.info("TRL %s: %s -> %s (%d optimizer steps%s)", job.algorithm, model_dir, out_dir, args.max_steps,
             f", resuming {resume}" if resume else "")
    if resume_step is not None and resume_step >= args.max_steps:
        # transformers would train one step past max_steps when resumed at the end: load instead
        if int(os.environ.get("RANK", "0")):  # rank 0 writes the outputs
            return out_dir / "final"
        model, tokenizer = _load_checkpoint(model_dir, resume)
        return _finish(model, tokenizer, out_dir, model_dir, metrics, metrics_path, seed, spec, outputs)
    ued = None
    if t.ued.enabled:
        from rlmeta.policy.base import derive_seed
        from rlmeta.rl.ued import UEDSampler

        ued = UEDRepeatSampler(UEDSampler(len(dataset), t.ued.staleness_weight, t.ued.temperature,
                                          derive_seed(seed, "ued")), t.batch_prompts, t.group_size,
                               t.updates_per_batch, len(dataset))
        if resume:
            ued.load_state_dict(json.loads((Path(resume) / UED_FILE).read_text()))
    trainer_ref: list = []  # the callback needs the trainer, which takes the callbacks
    evals = [EvalCallback(curve, model_dir, trainer_ref)] if curve.enabled else []
    with Preemption() as preemption:  # the pre-timeout signal: checkpoint this step, stop, requeue
        trainer = Trainer(model=str(model_dir), reward_funcs=reward_functions(job), args=args, train_dataset=dataset,
                          peft_config=lora_config(t.lora),
                          callbacks=[callback, *evals, PreemptCallback(preemption), *(callbacks or [])],
                          metrics=metrics, guard=guard, spec=spec, ued=ued, curve=curve, rollouts=rollouts,
                          dynamic_sampling=t.dynamic_sampling)
        trainer_ref.append(trainer)
        if report_to == "wandb" and trainer.accelerator.is_main_process:  # one W&B run, rank 0's
            with wandb_run(wandb, name, out_dir, {**spec, "out_dir": str(out_dir)}) as run:
                trainer.rlmeta_run = run
                trainer.train(resume_from_checkpoint=resume)
                rollouts.log_pending(run, trainer.state.global_step, step_key="train/global_step")
        else:
            trainer.train(resume_from_checkpoint=resume)
    if preemption.stopped_at is not None:
        preemption.exit(preemption.stopped_at, out_dir / f"checkpoint-{preemption.stopped_at}",
                        trainer.accelerator.is_main_process)
    # a sharded model's full weights, gathered onto rank 0 (a collective: every rank takes part)
    state = trainer.accelerator.get_state_dict(trainer.model) if t.distributed.strategy != "ddp" else None
    if not trainer.accelerator.is_main_process:
        return out_dir / "final"
    model = trainer.accelerator.unwrap_model(trainer.model) if state is None else _full_model(model_dir, t.lora, state)
    return _finish(model, trainer.processing_class, out_dir, model_dir, metrics, metrics_path, seed, spec, outputs)


def _finish(model, tokenizer, out_dir: Path, model_dir, metrics: MetricsTable, metrics_path, seed: int,
            spec: dict, outputs) -> Path:
    from rlmeta.provenance import write_training_record

    final = checkpoints.save_torch(model, tokenizer, out_dir / "final", source=model_dir,
                                   extra=lambda tmp: write_training_record(tmp, seed, spec))
    metrics.write(metrics_path)
    curve, curve_path, rollouts, rollouts_path = outputs
    if curve_path is not None:
        curve.write(curve_path)
    if rollouts_path is not None:
        rollouts.write(rollouts_path)
    log.info("saved %s", final)
    return final


def _full_model(model_dir, lora: LoraSettings | None, state: dict):
    """A fresh copy of the trained model (peft-wrapped for LoRA) holding a gathered full ``state`` dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora))
    model.load_state_dict(state, strict=True)
    return model


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


def command(p: argparse.ArgumentParser):
    """``rlmeta train-trl``."""
    from rlmeta.cli import add_training_arguments

    add_training_arguments(p, "folder for checkpoint-N/ and final/")
    return lambda a: train_trl(a.model, a.prompts, a.job, a.out, a.metrics, a.wandb, a.seed,
                               curve_path=a.eval_curve, rollouts_path=a.rollouts)
