"""First-order MAML (FOMAML), Reptile and the multi-task baseline over MATH subjects, full-parameter or
meta-LoRA, under torchrun/FSDP2.

One outer step: draw a seeded meta-batch of tasks; for each task, from the meta-parameters
theta take ``inner_steps`` SGD steps on a support batch (fast weights phi), then the query
loss L_q(phi) and its gradient at phi; restore theta bit for bit. The meta-gradient is
the mean of those gradients over the meta-batch; AdamW (warm-up, schedule, clipping)
applies it to theta. The query loss at theta before adapting gives each task's
``adaptation_gap = L_q(theta) - L_q(phi)``.

``meta.method`` reptile takes the same k + 1 passes as SGD steps (k on the support batch, one on
the query batch; Nichol et al. 2018) and feeds ``(theta - phi) / (inner_lr (k + 1))`` to the same
AdamW; multitask takes the k + 1 gradients at theta itself (no adaptation: fine-tuning on the
union of the training subjects). The three see the same batches, gradient passes and tokens.
Meta-training never loads a ``meta.test_subjects`` subject; with ``meta.validate_every`` it
adapts on seeded episodes of them (``val/*`` columns). See docs/meta-learning.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlmeta.meta.distributed import (
    DistContext,
    destroy,
    full_state_dict,
    init_distributed,
    load_resume,
    local,
    resolve_units,
    save_resume,
    shard_model,
)
from rlmeta.meta.tasks import TaskSampler, balanced_split, collate, encode, load_tasks
from rlmeta.preempt import Preemption
from rlmeta.settings import META_EVAL_KEYS, LoraSettings, MetaSettings, WandbSettings

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RESUMABLE_ACROSS = {"nproc", "shard_size", "fsdp_units", "checkpoint_every", "keep_checkpoints", *META_EVAL_KEYS}
"""Meta settings a run may change and still resume (DCP reshards; checkpointing does not change the maths)."""
ADAPTER_DIR = "meta_adapter"  # unmerged meta-LoRA adapter inside the final checkpoint


COMPUTE_COLUMNS = ["grad_passes", "train_tokens"]
"""Per outer step: forward-backward passes over all tasks and the non-padding tokens in them (all ranks)."""
VAL_COLUMNS = ["val/query_loss_pre", "val/query_loss_post", "val/gain"]
"""Meta-validation on the test subjects (null on the steps without one)."""


def metric_columns(subjects: list[str], test_subjects: list[str] = ()) -> list[str]:
    """The meta-learning columns of train_metrics besides the common ones."""
    cols = ["meta/loss", "meta/avg_adaptation_gap", "meta/query_loss_pre", *COMPUTE_COLUMNS, *VAL_COLUMNS]
    for s in subjects:
        cols += [f"{s}/query_loss_pre", f"{s}/query_loss_post", f"{s}/adaptation_gap"]
    cols += [f"val/{s}/query_loss_post" for s in test_subjects]
    return cols


def meta_parameters(model) -> list[torch.nn.Parameter]:
    """The meta-learned parameters: every trainable one (only the LoRA adapter for meta-LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def snapshot(params) -> list[torch.Tensor]:
    """Copies of the parameters' (local) data."""
    return [local(p.detach()).clone() for p in params]


@torch.no_grad()
def restore(params, snap) -> None:
    """Copy a snapshot back into the parameters in place (bit-exact)."""
    for p, s in zip(params, snap):
        local(p.detach()).copy_(s)


def batch_loss(model, batch: dict, ctx: DistContext) -> tuple[torch.Tensor, float, int]:
    """Token-mean cross-entropy over the labelled (solution) tokens of the whole batch, which may
    be split over the shard group: returns ``(loss to backprop, loss value, labelled tokens)``.

    A batch from ``shard_batch`` carries the whole batch's labelled-token count (``n_labels``): then no
    collective runs here and the loss value is this rank's share of it (the caller sums the shares once
    per outer step); without it the count and value are summed over the shard group on every call."""
    n_labels = batch.get("n_labels")
    dev = ctx.device
    logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    labels = batch["labels"][:, 1:].to(dev)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    if n_labels is not None:
        n = max(1, int(n_labels))
        return ce / n, float(ce.detach()) / n, int(n_labels)
    counts = ctx.shard_sum(torch.stack([ce.detach().float(), (labels != -100).sum().float()]).cpu())
    n = max(1.0, float(counts[1]))
    return ce / n, float(counts[0]) / n, int(counts[1])


def shard_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, ctx: DistContext) -> tuple[dict, list[int]]:
    """This rank's part of a batch of encoded rows under a length-balanced split over the shard group
    (``tasks.balanced_split``), with the whole batch's labelled-token count as ``n_labels`` (so
    ``batch_loss`` needs no collective); also the positions of the rows it took."""
    mine = balanced_split([len(ids) for ids, _ in examples], ctx.shard_size)[ctx.shard_rank]
    batch = collate([examples[i] for i in mine], pad_id)
    # labels[:, 1:] are the targets: a row's first token is never one
    batch["n_labels"] = sum(sum(1 for y in lab[1:] if y != -100) for _, lab in examples)
    return batch, mine


def sgd_step(params, lr: float) -> None:
    """Fast-weight update ``phi <- phi - lr * grad`` on the local shards; clears the grads."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                local(p.detach()).add_(local(p.grad), alpha=-lr)
            p.grad = None


def _accumulate(acc, params, scale: float = 1.0) -> None:
    with torch.no_grad():
        for a, p in zip(acc, params):
            if p.grad is not None:
                a.add_(local(p.grad).reshape(a.shape), alpha=scale)
            p.grad = None


def adapt_task(model, params, support: dict, query: dict, cfg: MetaSettings, ctx: DistContext,
               acc, method: str | None = None, theta=None) -> tuple[float, float]:
    """One task's k + 1 gradient passes from the current (meta) weights (k on the support batch, one on the
    query batch); adds the task's meta-gradient to ``acc`` (local shards):

    - fomaml: k SGD steps, then the query gradient at the adapted weights phi;
    - reptile: k + 1 SGD steps (the last on the query batch), then ``(theta - phi) / (inner_lr (k + 1))``
      (``theta``: the snapshot of the meta-parameters);
    - multitask: the mean of the k + 1 gradients at theta (nothing adapts).

    Returns ``(query loss before, after k steps)`` (multitask: the query loss at theta twice)."""
    method = method or cfg.method
    k = cfg.inner_steps
    model.eval()
    with torch.no_grad():
        _, pre, _ = batch_loss(model, query, ctx)
    model.train()
    for _ in range(k):
        loss, _, _ = batch_loss(model, support, ctx)
        loss.backward()
        if method == "multitask":
            _accumulate(acc, params, 1.0 / (k + 1))
        else:
            sgd_step(params, cfg.inner_lr)
    loss, post, _ = batch_loss(model, query, ctx)
    loss.backward()
    if method == "fomaml":
        _accumulate(acc, params)
    elif method == "multitask":
        _accumulate(acc, params, 1.0 / (k + 1))
        post = pre
    else:
        sgd_step(params, cfg.inner_lr)
        with torch.no_grad():
            for a, p, t in zip(acc, params, theta):
                a.add_((t - local(p.detach())).reshape(a.shape), alpha=1.0 / (cfg.inner_lr * (k + 1)))
    return pre, post


def _once(ctx: DistContext) -> float:
    """A task's count in the stats: every rank of its shard group adds its share of the losses, one adds the 1."""
    return 1.0 if ctx.shard_rank == 0 else 0.0


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


class FOMAML:
    """The meta-learner: model, data, sampler, outer optimizer and scheduler."""

    def __init__(self, model, tokenizer, support: dict, query: dict, cfg: MetaSettings, seed: int, ctx: DistContext,
                 validation: dict[str, list[dict]] | None = None):
        from rlmeta.schedules import torch_scheduler

        self.model, self.tok, self.cfg, self.ctx = model, tokenizer, cfg, ctx
        self.subjects = list(support)
        held = sorted(set(self.subjects) & set(cfg.test_subjects))
        if held:
            raise ValueError(f"subjects {held} are meta.test_subjects: meta-training never sees them")
        self.data = {"support": support, "query": query}
        self.validation = validation or {}
        self.seed = seed
        self.sampler = TaskSampler(self.subjects, seed)
        self.params = meta_parameters(model)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.outer_lr, weight_decay=0.0)
        self.sched = torch_scheduler(self.opt, cfg.lr_schedule, cfg.warmup_steps, cfg.outer_steps)
        self._cache: dict = {}
        self.seen: set[str] = set()  # problem_id of every row a training batch took (tests check it)

    def _encode(self, key, row: dict):
        if key not in self._cache:
            self._cache[key] = encode(self.tok, row, self.cfg.max_seq_len)
        return self._cache[key]

    def batch(self, step: int, slot: int, task: str, split: str) -> dict:
        """This rank's part (``shard_batch``: a length-balanced split over the shard group) of a seeded task
        batch."""
        rows = self.data[split][task]
        size = self.cfg.support_batch if split == "support" else self.cfg.query_batch
        idx = self.sampler.rows(step, slot, task, split, len(rows), size)
        batch, mine = shard_batch([self._encode((task, split, i), rows[i]) for i in idx], self.tok.pad_token_id,
                                  self.ctx)
        self.seen.update(rows[idx[j]]["problem_id"] for j in mine)
        return batch

    def validate(self) -> dict:
        """Meta-validation: mean query loss before and after ``inner_steps`` SGD steps over
        ``validate_episodes`` seeded episodes per test subject (the same episodes at every call), spread over
        the task groups like a meta-batch; the meta-parameters are restored exactly."""
        from rlmeta.meta.tasks import episode

        cfg, ctx = self.cfg, self.ctx
        subjects = list(self.validation)
        eps = [(s, e) for s in subjects for e in range(cfg.validate_episodes)]
        theta = snapshot(self.params)
        stats = torch.zeros(len(subjects), 3, dtype=torch.float64)
        for slot, (s, e) in enumerate(eps):
            if slot % ctx.task_groups != ctx.task_rank:
                continue
            rows = self.validation[s]
            sup_idx, qry_idx = episode(self.seed, "validation", s, e, len(rows), cfg.support_batch, cfg.query_batch)
            support, query = (shard_batch([self._encode(("val", s, i), rows[i]) for i in idx],
                                          self.tok.pad_token_id, ctx)[0] for idx in (sup_idx, qry_idx))
            self.model.eval()
            with torch.no_grad():
                _, pre, _ = batch_loss(self.model, query, ctx)
            self.model.train()
            for _ in range(cfg.inner_steps):
                loss, _, _ = batch_loss(self.model, support, ctx)
                loss.backward()
                sgd_step(self.params, cfg.inner_lr)
            self.model.eval()
            with torch.no_grad():
                _, post, _ = batch_loss(self.model, query, ctx)
            restore(self.params, theta)
            stats[subjects.index(s)] += torch.tensor([pre, post, _once(ctx)], dtype=torch.float64)
        ctx.world_sum(stats)  # the shard ranks' shares of each loss, the tasks of every group
        n = float(stats[:, 2].sum())
        row = {"val/query_loss_pre": float(stats[:, 0].sum()) / n, "val/query_loss_post": float(stats[:, 1].sum()) / n}
        row["val/gain"] = row["val/query_loss_pre"] - row["val/query_loss_post"]
        row.update({f"val/{s}/query_loss_post": float(stats[i, 1] / stats[i, 2]) for i, s in enumerate(subjects)})
        return row

    def meta_gradient(self, step: int) -> tuple[list[torch.Tensor], dict]:
        """Mean first-order meta-gradient (local shards) of outer step ``step`` and its task stats."""
        cfg, ctx = self.cfg, self.ctx
        tasks = self.sampler.meta_batch(step, cfg.meta_batch_size)
        theta = snapshot(self.params)
        acc = [torch.zeros_like(t) for t in theta]
        stats = torch.zeros(len(self.subjects), 3, dtype=torch.float64)  # pre, post, count
        tokens = passes = train_tokens = 0
        for slot, task in enumerate(tasks):
            if slot % ctx.task_groups != ctx.task_rank:
                continue
            support, query = self.batch(step, slot, task, "support"), self.batch(step, slot, task, "query")
            pre, post = adapt_task(self.model, self.params, support, query, cfg, ctx, acc, cfg.method, theta)
            restore(self.params, theta)
            stats[self.subjects.index(task)] += torch.tensor([pre, post, _once(ctx)], dtype=torch.float64)
            tokens += cfg.inner_steps * _tokens(support) + 2 * _tokens(query)
            train_tokens += cfg.inner_steps * _tokens(support) + _tokens(query)
            passes += cfg.inner_steps + 1
        flat = torch.cat([a.flatten() for a in acc]) if acc else torch.zeros(0)
        ctx.task_sum(flat)
        flat /= len(tasks)
        ctx.world_sum(stats)  # the shard ranks' shares of each loss, the tasks of every group
        # every rank of a shard group runs its tasks' passes on its part of the batch: count them once per group
        tok = ctx.world_sum(torch.tensor([tokens, train_tokens, passes if ctx.shard_rank == 0 else 0],
                                         dtype=torch.int64))
        grads, off = [], 0
        for a in acc:
            grads.append(flat[off:off + a.numel()].view_as(a))
            off += a.numel()
        return grads, {"stats": stats, "tokens": int(tok[0]), "train_tokens": int(tok[1]),
                       "grad_passes": int(tok[2])}

    def step(self, step: int) -> dict:
        """One outer step; returns its train_metrics row."""
        t0 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        grads, info = self.meta_gradient(step)
        sq = torch.tensor([float(sum((g.double() ** 2).sum() for g in grads))], dtype=torch.float64)
        norm = math.sqrt(float(self.ctx.shard_sum(sq)[0]))
        clip = self.cfg.max_grad_norm
        scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        for p, g in zip(self.params, grads):
            p.grad = torch.zeros_like(p)
            local(p.grad).copy_(g * scale)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        row = self._row(step, lr, norm, info, time.perf_counter() - t0)
        row["param_norm"] = self.param_norm()
        return row

    @torch.no_grad()
    def param_norm(self) -> float:
        """L2 norm of all weights of the model copy (its shards summed); NaN or inf as soon as one weight is."""
        sq = torch.stack([local(p.detach()).double().pow(2).sum() for p in self.model.parameters()]).sum()
        return math.sqrt(float(self.ctx.shard_sum(sq.reshape(1).cpu())[0]))

    def _row(self, step: int, lr: float, norm: float, info: dict, seconds: float) -> dict:
        st = info["stats"]
        n = float(st[:, 2].sum())
        row = {"step": step + 1, "lr": lr, "grad_norm": norm, "tokens": info["tokens"], "step_seconds": seconds,
               "meta/loss": float(st[:, 1].sum()) / n, "meta/query_loss_pre": float(st[:, 0].sum()) / n,
               "grad_passes": info["grad_passes"], "train_tokens": info["train_tokens"]}
        row["meta/avg_adaptation_gap"] = row["meta/query_loss_pre"] - row["meta/loss"]
        row["loss"] = row["meta/loss"]
        for i, s in enumerate(self.subjects):
            c = float(st[i, 2])
            pre, post = (float(st[i, 0]) / c, float(st[i, 1]) / c) if c else (math.nan, math.nan)
            row.update({f"{s}/query_loss_pre": pre, f"{s}/query_loss_post": post, f"{s}/adaptation_gap": pre - post})
        return row


# ---------------------------------------------------------------- model, checkpoints, CLI


def load_model(model_dir: str, lora: LoraSettings | None, seed: int, device):
    """Tokenizer and model (float32) from ``model_dir``; with ``lora`` a peft LoRA model whose
    adapter (seeded init) is the only trainable part."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    torch.manual_seed(seed)
    if lora is not None:
        from peft import get_peft_model

        from rlmeta.policy.lora import peft_config

        model = get_peft_model(model, peft_config(lora))
    return tok, model


def save_final(model, tokenizer, model_dir: str, lora: LoraSettings | None, out: Path, ctx: DistContext,
               record: dict | None = None) -> None:
    """Gather the full state dict on rank 0 and save a portable checkpoint atomically (LoRA merged, the
    adapter also kept in ``meta_adapter/`` for the adaptation evaluation)."""
    from transformers import AutoModelForCausalLM

    from rlmeta import checkpoints

    sd = full_state_dict(model, ctx)
    if ctx.is_main:
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora is not None:
            from peft import get_peft_model

            from rlmeta.policy.lora import peft_config

            fresh = get_peft_model(fresh, peft_config(lora))
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        from rlmeta.provenance import write_training_record

        def extra(tmp: Path) -> None:
            if lora is not None:  # the unmerged meta-adapter too: the adaptation evaluation adapts it
                fresh.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
            if record is not None:
                write_training_record(tmp, record["seed"], record["spec"])

        checkpoints.save_torch(fresh, tokenizer, out, source=model_dir, extra=extra, kind="fomaml")
    ctx.barrier()


def train(model_dir: str, tasks_dir: str, subjects: list[str], cfg: MetaSettings, seed: int, out: str | Path,
          metrics: str | Path, wandb: WandbSettings | None = None, ckpt_dir: str | Path | None = None,
          resume: bool = True, stop_after: int | None = None) -> Path:
    """Meta-train and save the final checkpoint to ``out``; returns ``out``. ``stop_after`` ends this
    run after that many outer steps without a final save (as if preempted; for resume tests)."""
    from rlmeta import checkpoints
    from rlmeta.tracking import DivergenceGuard, MetricsTable, wandb_run

    out = Path(out)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else out.parent
    wandb = wandb or WandbSettings()
    ctx = init_distributed(cfg.shard_size)
    if cfg.deterministic:  # before any CUDA work: cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first call
        from transformers import enable_full_determinism

        enable_full_determinism(seed)
    try:
        # under FSDP2 the model loads on CPU and fully_shard moves each rank's shards to its device
        tok, model = load_model(model_dir, cfg.lora, seed, torch.device("cpu") if ctx.distributed else ctx.device)
        model = shard_model(model, ctx, bf16=ctx.device.type == "cuda", units=cfg.fsdp_units)
        support = load_tasks(tasks_dir, subjects, "support")
        validation = validation_rows(tasks_dir, cfg) if cfg.validate_every else {}
        learner = FOMAML(model, tok, support, load_tasks(tasks_dir, subjects, "query"), cfg, seed, ctx, validation)
        spec = {"model": str(model_dir), "tasks_dir": str(tasks_dir), "subjects": list(subjects), "seed": seed,
                "meta": cfg.model_dump(mode="json", exclude=RESUMABLE_ACROSS),
                "inputs": checkpoints.inputs_fingerprint(model_dir, tasks_dir)}
        table = MetricsTable(metric_columns(subjects, list(validation)))
        guard = DivergenceGuard(cfg.guard, None, "meta.guard")  # DCP checkpoints: their weights are checked in memory
        start, last = 0, None
        if resume:
            last = checkpoints.latest(ckpt_dir, readable=lambda p: _state(p) is not None)
            if last is not None and _state(last).get("spec") != spec:
                last = None  # another run's checkpoints: left alone, never resumed
        if last is not None:
            state = load_resume(last, model, learner.opt, ctx)
            learner.sched.load_state_dict(state["scheduler"])
            start = state["step"]
            table.restore(last, start)
            guard.restore(state.get("guard", {}))
            if ctx.is_main:
                log.info("resuming from %s (step %d)", last, start)
        config = {**spec, "world": ctx.world}
        run_ctx = (wandb_run(wandb, run_name(ckpt_dir), ckpt_dir, config)
                   if ctx.is_main and wandb.mode != "disabled" else contextlib.nullcontext(None))
        n_params = sum(p.numel() for p in learner.params)
        if ctx.is_main:
            units = f" (FSDP units: {resolve_units(cfg.fsdp_units, ctx)})" if ctx.shard_size > 1 else ""
            log.info("%s %s: %d tasks, %d meta-parameters (%s), world %d = %d task groups x %d shards%s, "
                     "steps %d..%d",
                     cfg.method, model_dir, len(subjects), n_params, "meta-LoRA" if cfg.lora else "full", ctx.world,
                     ctx.task_groups, ctx.shard_size, units, start + 1, cfg.outer_steps)
        guard.begin(learner.param_norm())  # the weights' norm before the first update (unless resumed)
        def checkpoint(s: int) -> Path:
            last = ckpt_dir / str(s)
            guard.record_checkpoint(s, last)
            save_resume(last, model, learner.opt, ctx, {"step": s, "scheduler": learner.sched.state_dict(),
                                                        "spec": spec, "guard": guard.state()}, table)
            if ctx.is_main:
                checkpoints.prune(ckpt_dir, cfg.keep_checkpoints, spare=guard.protected())
            return last

        # the pre-timeout signal (rlmeta.preempt): checkpoint the step, stop, requeue
        with run_ctx as run, Preemption() as preemption:
            for step in range(start, cfg.outer_steps):
                if stop_after is not None and step - start >= stop_after:
                    return out
                row = learner.step(step)
                if validation and (step + 1) % cfg.validate_every == 0:
                    row.update(learner.validate())
                    if ctx.is_main:
                        log.info("step %d meta-validation on %s: query loss %.4f -> %.4f after %d inner steps",
                                 step + 1, ", ".join(validation), row["val/query_loss_pre"],
                                 row["val/query_loss_post"], cfg.inner_steps)
                guard.check(row["step"], {k: v for k, v in row.items() if "/" not in k or k.startswith("meta/")},
                            row["param_norm"])  # every rank: the reduced values agree, so all stop together
                if ctx.is_main:
                    table.add(row)
                    if run is not None:
                        run.log({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))},
                                step=row["step"])
                    log.info("step %d/%d meta/loss %.4f gap %+.4f lr %.2e grad_norm %.3f tokens %d %.2fs (%.0f tok/s)",
                             row["step"], cfg.outer_steps, row["loss"], row["meta/avg_adaptation_gap"], row["lr"],
                             row["grad_norm"], row["tokens"], row["step_seconds"], row["tokens"] / row["step_seconds"])
                s = step + 1
                if s % cfg.checkpoint_every == 0 and s < cfg.outer_steps:
                    checkpoint(s)
                if s < cfg.outer_steps and preemption.agreed():  # every rank: a collective
                    last = ckpt_dir / str(s) if s % cfg.checkpoint_every == 0 else checkpoint(s)
                    preemption.exit(s, last, ctx.is_main)
        save_final(model, tok, model_dir, cfg.lora, out, ctx, {"seed": seed, "spec": spec})
        if ctx.is_main:
            table.write(metrics)
            log.info("saved %s", out)
        return out
    finally:
        destroy(ctx)


def run_name(ckpt_dir: Path) -> str:
    """The W&B run name: the experiment, with the method for a baseline (<exp>/baselines/<method>/checkpoints)."""
    from rlmeta import checkpoints

    name = checkpoints.run_name(ckpt_dir)
    p = Path(ckpt_dir)
    if p.name == "checkpoints" and p.parent.parent.name == "baselines":
        return f"{p.parents[2].name}-{name}"
    return name


def validation_rows(tasks_dir: str | Path, cfg: MetaSettings) -> dict[str, list[dict]]:
    """The meta-validation rows: each test subject's support and query rows (never trained on)."""
    if not cfg.test_subjects:
        raise ValueError("meta.validate_every needs meta.test_subjects to validate on")
    sup, qry = load_tasks(tasks_dir, cfg.test_subjects, "support"), load_tasks(tasks_dir, cfg.test_subjects, "query")
    return {s: sup[s] + qry[s] for s in cfg.test_subjects}


def _state(ckpt: Path) -> dict | None:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def command(p: argparse.ArgumentParser):
    """``rlmeta train-fomaml`` (plain python, or under ``rlmeta launch`` for torchrun)."""
    from rlmeta.cli import add_settings, add_wandb, existing_dir, model_ref

    p.add_argument("--model", required=True, type=model_ref, help="initial checkpoint folder (transformers format)")
    p.add_argument("--tasks-dir", required=True, type=existing_dir,
                   help="folder with <subject>/{support,query}.parquet")
    p.add_argument("--subjects", nargs="+", required=True,
                   help="the training subjects (tasks); none of meta.test_subjects")
    add_settings(p, "meta", MetaSettings, "the experiment's meta block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="final checkpoint folder (written atomically)")
    p.add_argument("--metrics", required=True, help="train_metrics.parquet to write when training ends")
    p.add_argument("--checkpoint-dir", default=None, help="resume checkpoints <dir>/<step>/ (default: --out's parent)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a matching checkpoint exists")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    add_wandb(p)
    return lambda a: train(a.model, a.tasks_dir, a.subjects, a.meta, a.seed, a.out, a.metrics, a.wandb,
                           a.checkpoint_dir, not a.no_resume, a.stop_after)
