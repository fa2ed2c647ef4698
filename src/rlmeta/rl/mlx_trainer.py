"""Online GRPO / GSPO on MLX.

One step is one rollout batch: ``batch_prompts`` train prompts (a seeded shuffle per epoch, or
``UEDSampler`` by learning potential), ``group_size`` completions each from the batched MLX
policy, rewards from the experiment's reward mix (``rlmeta.scoring``), group-relative advantages
(a group is one prompt's completions: one headline, one problem), then ``updates_per_batch`` AdamW
updates on the batch. The first update is on-policy; later ones weight by the importance ratio
against the log-probs the sampling policy recorded (token level for GRPO, sequence level for GSPO),
with ``objectives_mlx.policy_loss`` (TRL's loss, k3 KL to a frozen reference copy when beta > 0).
The learning rate follows ``rlmeta.schedules.mlx_schedule`` over optimizer updates.

Checkpoints (``mlx_state``) land in ``<out>/<step>/`` every ``checkpoint_every`` steps; a rerun
resumes from the latest complete one and ends where an uninterrupted run would, with every step's
metrics row, every evaluation row and every rollout (``rlmeta.rl.evidence``: held-out evaluations before the
first step, every ``eval_every`` steps and after the last; each training completion with its rewards and
advantage). The final merged model goes to ``<out>/final``; ``train_metrics.parquet`` is written
when training ends. Metrics use the TRL trainer's train_metrics columns, one row per step.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from rlmeta import checkpoints
from rlmeta.policy import load_policy, mlx_packed
from rlmeta.policy.base import LOGITS_BUDGET, derive_seed
from rlmeta.policy.mlx_compat import checkpointed_layers
from rlmeta.policy.mlx_policy import pad_batch, sequence_logprobs
from rlmeta.prompts import train_rows
from rlmeta.provenance import write_training_record
from rlmeta.rl import dapo, mlx_state
from rlmeta.rl.evidence import CHUNKS_DIR, EvalCurve, RolloutLog, eval_line, rollout_records
from rlmeta.rl.objectives import group_advantages
from rlmeta.rl.objectives_mlx import policy_loss
from rlmeta.rl.ued import UEDSampler
from rlmeta.schedules import mlx_schedule
from rlmeta.scoring import score
from rlmeta.settings import RLJob, WandbSettings, shaping_of
from rlmeta.tracking import DivergenceGuard, MetricsTable, log_eval, wandb_run

log = logging.getLogger(__name__)


class MLXTrainer:
    """Policy, reference, optimizer, prompt sampler and step counter of one MLX GRPO/GSPO run."""

    def __init__(self, model_dir: str | Path, prompts_path: str | Path, job: RLJob, seed: int = 0,
                 out_dir: str | Path | None = None):
        self.job, self.t, self.seed = job, job.train, seed
        self.level = "sequence" if job.algorithm == "gspo" else "token"
        self.eps_low, self.eps_high = job.epsilons
        self.spec = {"model": str(model_dir), "seed": seed, "job": job.model_dump(mode="json"),
                     "inputs": checkpoints.inputs_fingerprint(model_dir, prompts_path)}
        self.prompts = train_rows(prompts_path, job.max_train_prompts)
        self.policy = load_policy(model_dir, "mlx", dtype=self.t.dtype,
                                  chat_template_kwargs=self.t.chat_template_kwargs)
        if self.t.lora is not None:
            from rlmeta.policy.lora import apply_lora

            apply_lora(self.policy, self.t.lora, seed=seed)
        # the KL reference: a LoRA run's own base weights with the adapters switched off; else a frozen copy
        self.kl = self.t.beta > 0
        self.ref = load_policy(model_dir, "mlx", dtype=self.t.dtype).model if self.kl and self.t.lora is None else None
        if self.ref is not None:
            self.ref.freeze()
        self.prompt_ids = self.policy.encode_prompts([r["prompt"] for r in self.prompts])
        n, k = len(self.prompts), self.t.batch_prompts
        if self.t.ued.enabled:
            if k > n:
                log.warning("UED draws distinct prompts: batch_prompts %d capped at the %d train prompts", k, n)
            self.batch_prompts = min(k, n)
            self.sampler = UEDSampler(n, self.t.ued.staleness_weight, self.t.ued.temperature, derive_seed(seed, "ued"))
        else:
            self.batch_prompts = k
            self.sampler = mlx_state.EpochSampler(n, derive_seed(seed, "order"))
        mu = self.t.updates_per_batch
        lr = mlx_schedule(self.t.lr_schedule, self.t.learning_rate, self.t.warmup_steps * mu, self.t.steps * mu)
        self.optimizer = optim.AdamW(learning_rate=lr, weight_decay=self.t.weight_decay, bias_correction=True)
        self.grad_fn = nn.value_and_grad(self.policy.model, self._loss)
        if self.t.gradient_checkpointing and mlx_packed.HOST_GEMM and self.t.dtype == "float32":
            log.warning("train.gradient_checkpointing: the float32 CPU fast path (rlmeta.policy.mlx_packed) runs its "
                        "own layer loop and ignores it; it applies on Metal and with train.dtype bfloat16/float16")
        self.guard = DivergenceGuard(self.t.guard, job.reward_floor, "train.guard", checkpoints.weights_finite)
        self.step, self.tokens = 0, 0
        self._metrics: dict = {}
        self.curve = EvalCurve(prompts_path, job, seed, self.t.steps)
        chunks = Path(out_dir) / CHUNKS_DIR if out_dir is not None else None
        self.rollouts = RolloutLog(list(job.rewards), chunks, enabled=self.t.log_rollouts)

    # -- rollout ---------------------------------------------------------------------------
    def rollout(self) -> dict:
        """Sample, score and pack one batch for ``update`` (also returns its reward statistics).

        With ``train.dynamic_sampling`` (DAPO), groups whose total rewards are all equal are dropped and further
        rollout batches are drawn (at most ``dynamic_sampling`` extra ones) until ``batch_prompts`` groups with a
        spread are kept; the step trains on those (fewer when the budget runs out, the first batch as drawn when
        not one group had a spread). With ``train.mask_truncated``, completions that hit ``max_new_tokens``
        without a stop token get a zero loss mask; their rewards still enter their group's advantages (TRL)."""
        t, g = self.t, self.t.group_size
        draws = [self._draw(0)]
        if t.dynamic_sampling:
            kept = dapo.DynamicBatch(self.batch_prompts)
            kept.add(dapo.has_spread(draws[0]["total"], g))
            while not kept.full and len(draws) <= t.dynamic_sampling:
                draws.append(self._draw(len(draws)))
                kept.add(dapo.has_spread(draws[-1]["total"], g))
            chosen = kept.selection()
        else:
            chosen = [(0, j) for j in range(len(draws[0]["idx"]))]
        rows_of = lambda b, j: range(j * g, (j + 1) * g)  # a batch's groups are contiguous, in prompt order
        pick = [(b, i) for b, j in chosen for i in rows_of(b, j)]
        gens = [draws[b]["gens"][i] for b, i in pick]
        rows = [draws[b]["rows"][i] for b, i in pick]
        total = np.array([draws[b]["total"][i] for b, i in pick])
        components = {n: np.array([draws[b]["components"][n][i] for b, i in pick]) for n in self.job.rewards}
        idx = [draws[b]["idx"][j] for b, j in chosen]
        adv = group_advantages(total, g, t.scale_rewards)
        ids, plen, mask = pad_batch([x.prompt_ids for x in gens], [x.token_ids for x in gens], self.policy.pad_id)
        truncated = np.array([x.finish_reason == "length" for x in gens])
        loss_mask = mask
        if t.mask_truncated:  # DAPO's overlong filtering: out of the loss, still in the advantages (as TRL)
            loss_mask = mask * mx.array((~truncated).astype(np.float32))[:, None].astype(mask.dtype)
        old = np.zeros(mask.shape, np.float32)
        for i, x in enumerate(gens):
            old[i, :len(x.logprobs)] = x.logprobs
        batch = {"ids": ids, "plen": plen, "mask": mask, "loss_mask": loss_mask, "old": mx.array(old),
                 "adv": mx.array(adv.astype(np.float32)), "ref": None}
        if self.kl:
            batch["ref"] = self.reference_logprobs(ids, plen, mask)
        lens = np.array([len(x.token_ids) for x in gens])
        self.rollouts.add(rollout_records(
            self.step, [r["prompt_id"] for r in rows], [k // g for k in range(len(gens))],
            [x.sample_idx for x in gens], [x.text for x in gens], total, components, adv, lens, truncated))
        stats = {"reward_mean": float(total.mean()),
                 "reward_std": float(total.std(ddof=1)) if total.size > 1 else 0.0,
                 "zero_std_frac": float((~dapo.has_spread(total, g)).mean()),
                 "completion_len_mean": float(lens.mean()),
                 "new_tokens": int(sum(len(x.token_ids) + len(x.prompt_ids) for d in draws for x in d["gens"])),
                 **{f"reward/{n}": float(v.mean()) for n, v in components.items()}}
        if t.overlong_buffer is not None:
            stats[dapo.OVERLONG] = float(np.mean([draws[b]["penalty"][i] for b, i in pick]))
        if t.dynamic_sampling:
            stats[dapo.EXTRA_BATCHES], stats[dapo.GROUPS_KEPT] = len(draws) - 1, len(kept.kept)
        return {"batch": batch, "stats": stats, "indices": idx, "generations": gens}

    def _draw(self, extra: int) -> dict:
        """One rollout batch (``extra``: 0 = the step's batch, k = dynamic sampling's k-th extra one): prompt
        indices, generations, rows, total rewards (the overlong penalty included), components and penalty."""
        t, g = self.t, self.t.group_size
        idx = self.sampler.sample(self.batch_prompts)
        seed = derive_seed(self.seed, "rollout", self.step) if extra == 0 else \
            derive_seed(self.seed, "rollout", self.step, "extra", extra)
        self.policy.model.eval()
        gens = self.policy.generate([self.prompt_ids[i] for i in idx], n=g, temperature=t.temperature,
                                    **shaping_of(t), max_new_tokens=t.max_new_tokens, seed=seed)
        rows = [self.prompts[idx[x.prompt_index]] for x in gens]
        s = score([x.text for x in gens], [r["reference"] for r in rows], [r["prompt"] for r in rows],
                  self.job.rewards, self.job.reward_params)
        total, penalty = s.total, None
        if t.overlong_buffer is not None:
            penalty = dapo.overlong_penalty([len(x.token_ids) for x in gens], t.max_new_tokens, t.overlong_buffer)
            total = total + t.overlong_penalty * penalty
        self.sampler.update(idx, total.reshape(-1, g).tolist())
        return {"idx": list(idx), "gens": gens, "rows": rows, "total": total, "components": s.components,
                "penalty": penalty}

    def reference_logprobs(self, ids: mx.array, plen: mx.array, mask: mx.array) -> mx.array:
        """The frozen reference's completion log-probs (the KL term's), evaluated."""
        if self.ref is None:  # LoRA: the base is the reference
            from rlmeta.policy.lora import mlx_adapters_off

            with mlx_adapters_off(self.policy.model):
                ref = mx.stop_gradient(sequence_logprobs(self.policy.model, ids, plen, mask, self.t.temperature))
                mx.eval(ref)
            return ref
        ref = mx.stop_gradient(sequence_logprobs(self.ref, ids, plen, mask, self.t.temperature))
        mx.eval(ref)
        return ref

    # -- update ----------------------------------------------------------------------------
    def _loss(self, model, ids, plen, mask, old, ref, adv, num_items, loss_mask=None):
        # the entropies come from the same forward pass (no gradient): a metric, a collapse shows in it first
        logp, entropy = sequence_logprobs(model, ids, plen, mask, self.t.temperature, entropy=True)
        loss, self._metrics = policy_loss(
            logp, old, ref, adv, mask if loss_mask is None else loss_mask, level=self.level, eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.t.beta, loss_type=self.t.loss_type, max_completion_length=self.t.max_new_tokens,
            num_items=num_items, entropy=entropy)
        return loss

    def _chunks(self, batch: dict) -> list[slice]:
        """Row slices whose logits stay under ``LOGITS_BUDGET`` (one slice for small batches), of
        whole groups where the budget allows: ``sequence_logprobs`` runs a shared prompt once per slice."""
        n, t = batch["mask"].shape
        rows = max(1, LOGITS_BUDGET // max(1, t * self.policy.vocab_size))
        g = self.t.group_size
        rows = rows - rows % g if rows >= g else rows
        return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]

    def update(self, batch: dict, old_logp: bool) -> dict:
        """One AdamW update on the whole batch (micro-batched, gradients accumulated)."""
        grads, loss, metrics = self.gradients(batch, old_logp)
        applied = self.apply(grads)
        lr = self.optimizer.learning_rate.item()  # set from the schedule by the update just applied
        return {"loss": loss, "lr": lr, **applied, **metrics}

    def gradients(self, batch: dict, old_logp: bool) -> tuple[dict, float, dict]:
        """(gradients, loss, policy-loss metrics) of the batch, summed over its micro-batches."""
        mask = batch.get("loss_mask", batch["mask"])  # without truncated completions (train.mask_truncated)
        n, tokens = mask.shape[0], max(mask.sum().item(), 1.0)
        loss_total, grads, metrics = 0.0, None, {}
        for sl in self._chunks(batch):
            m = mask[sl]
            rows_w, tok_w = (sl.stop - sl.start) / n, m.sum().item() / tokens
            w = {"grpo": rows_w, "dr_grpo": rows_w, "bnpo": tok_w, "dapo": 1.0}[self.t.loss_type]
            ref = None if batch["ref"] is None else batch["ref"][sl]
            old = batch["old"][sl] if old_logp else None
            with checkpointed_layers(self.policy.model, bool(self.t.gradient_checkpointing)):  # builds the graph
                loss, g = self.grad_fn(self.policy.model, batch["ids"][sl], batch["plen"][sl], batch["mask"][sl],
                                       old, ref, batch["adv"][sl], tokens, m)
            if w != 1.0:
                g = tree_map(lambda a, w=w: a * w, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_total += loss.item() * w
            mw = rows_w if self.level == "sequence" else tok_w
            for k, v in self._metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v * (tok_w if k in ("kl", "entropy") else mw)
        return grads, loss_total, metrics

    def apply(self, grads: dict) -> dict:
        """Clip and apply ``grads`` (AdamW); returns the gradient norm before clipping."""
        max_norm = self.t.max_grad_norm
        grads, norm = optim.clip_grad_norm(grads, math.inf if max_norm is None else max_norm)
        self.optimizer.update(self.policy.model, grads)
        mx.eval(self.policy.model.trainable_parameters(), self.optimizer.state)
        return {"grad_norm": norm.item()}

    def param_norm(self) -> float:
        """L2 norm of all weights (frozen ones included); NaN or inf as soon as one weight is.

        Each tensor's norm is taken as ``max|p| * ||p / max|p|||`` and the tensors are combined in float64, so
        huge but finite weights (1e30) give a finite norm instead of overflowing float32's sum of squares."""
        params = [p.astype(mx.float32) for _, p in tree_flatten(self.policy.model.parameters())]
        peaks = [mx.abs(p).max() for p in params]
        scaled = [mx.sqrt(((p / mx.where(m > 0, m, 1.0)) ** 2).sum()) for p, m in zip(params, peaks)]
        peaks, scaled = mx.stack(peaks), mx.stack(scaled)
        mx.eval(peaks, scaled)
        norms = np.array(peaks, dtype=np.float64) * np.array(scaled, dtype=np.float64)
        return float(np.sqrt((norms ** 2).sum()))

    def train_step(self) -> dict:
        """Rollout + ``updates_per_batch`` updates; returns the step's train_metrics row (+ ``updates``)."""
        t0 = time.perf_counter()
        mx.random.seed(derive_seed(self.seed, "step", self.step))
        ro = self.rollout()
        mu = self.t.updates_per_batch
        self.policy.model.train()
        updates = [self.update(ro["batch"], old_logp=mu > 1) for _ in range(mu)]
        self.policy.model.eval()
        self.step += 1
        self.tokens += ro["stats"].pop("new_tokens")
        mean = lambda k: float(np.mean([u[k] for u in updates]))
        row = {"step": self.step, "loss": mean("loss"), "kl": mean("kl") if self.kl else None,
               "clip_ratio": mean("clip_ratio"), "grad_norm": mean("grad_norm"), "lr": updates[-1]["lr"],
               "tokens": self.tokens, **ro["stats"], "param_norm": self.param_norm(), "entropy": mean("entropy"),
               "step_seconds": time.perf_counter() - t0}
        return {**row, "updates": updates, "indices": ro["indices"]}

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "spec": self.spec, "sampler": self.sampler.state_dict(),
                "sampler_kind": type(self.sampler).__name__, "guard": self.guard.state(),
                "next_rollout_seed": derive_seed(self.seed, "rollout", self.step)}

    def save(self, path: str | Path, metrics: MetricsTable) -> Path:
        return mlx_state.save_checkpoint(path, self.policy, self.optimizer, self.state(), metrics, more=self.curve.save)

    def load(self, ckpt: str | Path) -> None:
        """Resume from a checkpoint written by ``save``."""
        state = mlx_state.read_state(ckpt)
        mlx_state.load_weights(self.policy, ckpt)
        mlx_state.load_optimizer(self.optimizer, ckpt)
        self.sampler.load_state_dict(state["sampler"])
        self.guard.restore(state.get("guard", {}))
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.curve.restore(ckpt, self.step)
        self.rollouts.restore(self.step)

    def resumable(self, ckpt: Path) -> bool:
        """True when ``ckpt`` was written by a run of this spec (and the same sampler)."""
        state = mlx_state.read_state(ckpt) or {}
        return state.get("spec") == self.spec and state.get("sampler_kind") == type(self.sampler).__name__


def progress(row: dict, steps: int) -> str:
    """The step's stderr line: reward, loss, kl, clip ratio, grad norm, length, s/step."""
    f = lambda k: "-" if row[k] is None else f"{row[k]:.4g}"
    return (f"step {row['step']}/{steps} reward={f('reward_mean')} loss={f('loss')} kl={f('kl')} "
            f"clip={f('clip_ratio')} grad_norm={f('grad_norm')} len={f('completion_len_mean')} "
            f"{row['step_seconds']:.2f}s/step")


def evaluate_if_due(trainer: MLXTrainer, run) -> None:
    """The evaluation during training at this step, when one is due: a row, a W&B log and a stderr line."""
    if trainer.curve.due(trainer.step):
        row = trainer.curve.evaluate(trainer.policy, trainer.step)
        log_eval(run, row, trainer.step)
        print(eval_line(row), file=sys.stderr, flush=True)


def train_mlx(model_dir: str | Path, prompts_path: str | Path, job: RLJob, out_dir: str | Path,
              metrics_path: str | Path, wandb: WandbSettings | None = None, seed: int = 0,
              stop_after: int | None = None, curve_path: str | Path | None = None,
              rollouts_path: str | Path | None = None) -> Path:
    """Train and return ``<out_dir>/final``; resumes from the latest complete ``<out_dir>/<step>/``.

    ``curve_path``: the eval_curve parquet, ``rollouts_path``: the rollouts folder, both written when training
    ends (not written when None).

    ``stop_after``: return after this many steps of this call without the final save, as a
    killed run would (tests); returns the last checkpoint (or None).
    """
    out_dir = Path(out_dir)
    wandb = wandb or WandbSettings()
    trainer = MLXTrainer(model_dir, prompts_path, job, seed, out_dir)
    metrics = MetricsTable(dapo.metric_columns(job))
    ckpt = checkpoints.latest(out_dir, readable=lambda p: mlx_state.read_state(p) is not None)
    if ckpt is not None and not trainer.resumable(ckpt):
        checkpoints.remove_all(out_dir, "trained with a different spec")
        ckpt = None
    if ckpt is not None:
        trainer.load(ckpt)
        metrics.restore(ckpt, trainer.step)
        log.info("resuming %s at step %d", ckpt, trainer.step)
    else:
        trainer.rollouts.restore(0)  # chunks of an earlier run of another spec (or none)
    steps, every = trainer.t.steps, trainer.t.checkpoint_every
    config = {**trainer.spec, "out_dir": str(out_dir), "backend": "mlx"}
    done = 0
    trainer.guard.begin(trainer.param_norm())  # the weights' norm before the first update (unless resumed)
    with wandb_run(wandb, checkpoints.run_name(out_dir), out_dir, config) as run:
        evaluate_if_due(trainer, run)  # the starting policy (step 0), unless resumed
        while trainer.step < steps:
            if stop_after is not None and done >= stop_after:
                return ckpt
            out = trainer.train_step()
            done += 1
            row = {k: v for k, v in out.items() if k not in ("updates", "indices")}
            metrics.add(row)
            run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
            print(progress(row, steps), file=sys.stderr, flush=True)
            trainer.guard.check(row["step"], row, row["param_norm"])  # raises on NaN/inf or divergence
            evaluate_if_due(trainer, run)
            if trainer.step % every == 0:
                path = out_dir / str(trainer.step)
                trainer.guard.record_checkpoint(trainer.step, path)  # part of the state the checkpoint saves
                trainer.rollouts.checkpoint(run, trainer.step)  # before the checkpoint: a resume drops later rows
                ckpt = trainer.save(path, metrics)
        trainer.rollouts.log_pending(run, trainer.step)
    final = trainer.policy.save(out_dir / "final", extra=lambda tmp: write_training_record(tmp, seed, trainer.spec))
    metrics.write(metrics_path)
    if curve_path is not None:
        trainer.curve.write(curve_path)
    if rollouts_path is not None:
        trainer.rollouts.write(rollouts_path)
    log.info("saved %s", final)
    return final


def command(p: argparse.ArgumentParser):
    """``rlmeta train-mlx``."""
    from rlmeta.cli import add_training_arguments

    add_training_arguments(p, "folder for <step>/ checkpoints and final/")
    return lambda a: train_mlx(a.model, a.prompts, a.job, a.out, a.metrics, a.wandb, a.seed,
                               curve_path=a.eval_curve, rollouts_path=a.rollouts)
