"""Warm start: supervised fine-tuning on the prompts table's reference completions, so the
base policy already emits the expected format before RL.

Each train row with a ``reference_completion`` becomes ``chat_template(prompt,
add_generation_prompt=True) + reference_completion + "<|im_end|>"``; prompt and completion are
tokenized separately (as at generation time) and the loss is the mean cross-entropy over
completion tokens only. AdamW (bias-corrected on both backends, weight decay 0), gradient-norm
clipping, the settings' schedule (``rlmeta.schedules``: by default cosine from ``learning_rate`` to
``min_lr_ratio`` of it), batches drawn from seeded permutations. The output is a portable
checkpoint (``rlmeta.checkpoints``) plus ``warmstart_metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from rlmeta import checkpoints
from rlmeta.errors import UserError
from rlmeta.io import atomic_dir, read_table
from rlmeta.models.hub import hub_errors, is_hub_id
from rlmeta.settings import WarmstartSettings
from rlmeta.tables import PROMPTS

log = logging.getLogger(__name__)

END = "<|im_end|>"
METRICS = "warmstart_metrics.json"


def sft_examples(tokenizer, prompts_table_path: str | Path, max_seq_len: int,
                 chat_template_kwargs: dict | None = None) -> tuple[list[tuple[list[int], int]], int]:
    """``([(token_ids, n_prompt_tokens), ...], n_skipped)`` for the train rows with a reference
    completion; sequences are cut to ``max_seq_len``, rows left without completion tokens skipped.
    ``chat_template_kwargs``: the experiment's ``train.chat_template_kwargs``, so that the prompts are the
    text RL trains on (``rlmeta.policy.base.prompt_text``)."""
    from rlmeta.policy.base import prompt_text

    rows = read_table(prompts_table_path, PROMPTS).to_pylist()
    out, skipped = [], 0
    for r in rows:
        if r["split"] != "train" or r["reference_completion"] is None:
            continue
        text = prompt_text(tokenizer, r["prompt"], chat_template_kwargs)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        c = tokenizer(r["reference_completion"] + END, add_special_tokens=False)["input_ids"]
        if len(p) >= max_seq_len:
            skipped += 1
            continue
        out.append(((p + c)[:max_seq_len], len(p)))
    if not out:
        raise UserError(f"{prompts_table_path}: no train rows with a reference_completion fit in "
                        f"warmstart.max_seq_len={max_seq_len} ({skipped} prompts too long): raise it")
    return out, skipped


def batches(examples, batch_size: int, steps: int, seed: int, pad_id: int):
    """Yield ``steps`` batches ``(inputs, targets, mask)`` (int32/int32/float32 numpy, right-padded);
    ``mask`` is 1 where the target is a completion token."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(examples)).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        seqs = [examples[i] for i in chosen]
        width = max(len(ids) for ids, _ in seqs)
        ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=np.float32)
        for row, (s, n_prompt) in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, n_prompt : len(s)] = 1.0
        yield ids[:, :-1], ids[:, 1:], mask[:, 1:]


def _local_dir(model_dir: str | Path) -> Path:
    """The local folder of a checkpoint (a hub id is fetched through the hub cache)."""
    if not is_hub_id(model_dir):
        return Path(model_dir)
    with hub_errors(str(model_dir)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_dir)))


def _train_torch(src: Path, tmp: Path, data, ws: WarmstartSettings, seed: int,
                 log_every: int) -> tuple[list[float], float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmeta.schedules import torch_scheduler

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", trust_remote_code=False).to(device)
    model.train()
    log.info("warmstart[torch] on %s", device)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch_scheduler(opt, ws.lr_schedule, ws.warmup_steps, ws.steps, ws.min_lr_ratio)
    losses, t0 = [], time.perf_counter()
    for step, (x, y, m) in enumerate(data):
        # Right padding under a causal mask: real tokens never see the pads, so no attention_mask.
        logits = model(input_ids=torch.from_numpy(x).long().to(device)).logits.float()
        targets = torch.from_numpy(y).long().flatten().to(device)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        mask = torch.from_numpy(m).flatten().to(device)
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ws.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ws.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        _progress("torch", step, ws.steps, losses, t0, log_every)
    seconds = time.perf_counter() - t0
    checkpoints.save_torch(model.eval().cpu(), AutoTokenizer.from_pretrained(src), tmp, source=src)
    return losses, seconds


def _train_mlx(src: Path, tmp: Path, data, ws: WarmstartSettings, seed: int,
               log_every: int) -> tuple[list[float], float]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from rlmeta.policy.mlx_policy import MLXPolicy
    from rlmeta.schedules import mlx_schedule

    mx.random.seed(seed)
    policy = MLXPolicy.load(src)
    model = policy.model
    model.train()

    def loss_fn(model, x, y, m):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="none")
        return (ce * m).sum() / m.sum()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=mlx_schedule(ws.lr_schedule, ws.learning_rate, ws.warmup_steps, ws.steps,
                                                 ws.min_lr_ratio),
                      betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, bias_correction=True)
    losses, t0 = [], time.perf_counter()
    for step, (x, y, m) in enumerate(data):
        loss, grads = value_and_grad(model, mx.array(x), mx.array(y), mx.array(m))
        if ws.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, ws.max_grad_norm)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
        _progress("mlx", step, ws.steps, losses, t0, log_every)
    seconds = time.perf_counter() - t0
    model.eval()
    policy.save(tmp)
    return losses, seconds


def _progress(backend: str, step: int, steps: int, losses: list[float], t0: float, every: int) -> None:
    if (step + 1) % every == 0 or step + 1 == steps:
        log.info("warmstart[%s] step %d/%d loss %.4f (%.3f s/step)", backend, step + 1, steps, losses[-1],
                 (time.perf_counter() - t0) / (step + 1))


def warmstart(model_dir: str | Path, prompts_table_path: str | Path, out_dir: str | Path, ws: WarmstartSettings,
              seed: int, backend: str = "torch", chat_template_kwargs: dict | None = None) -> Path:
    """Fine-tune ``model_dir`` on reference completions for ``ws.steps`` optimizer steps and write the
    checkpoint to ``out_dir`` (atomically); ``ws.steps == 0`` copies the model unchanged.
    ``chat_template_kwargs``: the experiment's ``train.chat_template_kwargs`` (the prompts' template arguments).

    ``warmstart_metrics.json`` holds per-step ``losses``, ``initial_loss`` (the first batch, before
    any update), ``final_loss`` (mean of the last max(1, steps // 10) steps) and ``seconds_per_step``
    (the training loop alone, without loading and saving).
    """
    src = _local_dir(model_dir)
    metrics = dict(backend=backend, seed=seed, model=str(model_dir), settings=ws.model_dump(), losses=[],
                   chat_template_kwargs=dict(chat_template_kwargs or {}))
    with atomic_dir(out_dir) as tmp:
        if ws.steps > 0:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src)
            examples, skipped = sft_examples(tok, prompts_table_path, ws.max_seq_len, chat_template_kwargs)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            data = batches(examples, ws.batch_size, ws.steps, seed, pad)
            train = _train_torch if backend == "torch" else _train_mlx
            staged = tmp / "model"
            losses, seconds = train(src, staged, data, ws, seed, max(1, ws.steps // 10))
            for f in staged.iterdir():
                f.rename(tmp / f.name)
            staged.rmdir()
            tail = losses[-max(1, ws.steps // 10):]
            metrics.update(losses=losses, initial_loss=losses[0], final_loss=sum(tail) / len(tail),
                           n_examples=len(examples), n_skipped=skipped, seconds=seconds,
                           seconds_per_step=seconds / ws.steps)
            log.info("warmstart[%s]: loss %.3f -> %.3f over %d steps, %.3f s/step", backend, losses[0],
                     metrics["final_loss"], ws.steps, seconds / ws.steps)
        else:
            for f in sorted(src.iterdir()):
                if f.is_file() and not f.name.startswith(".") and f.name not in (METRICS, checkpoints.MARKER):
                    shutil.copy(f, tmp / f.name)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        checkpoints.write_marker(tmp, kind="warmstart", steps=ws.steps)
    return Path(out_dir)


def command(p: argparse.ArgumentParser):
    """``rlmeta warmstart``: SFT a checkpoint on a prompts table's reference completions."""
    from rlmeta.cli import add_settings, chat_template_kwargs_type, existing_file, model_ref

    p.add_argument("--model", required=True, type=model_ref, help="checkpoint folder (or hub id)")
    p.add_argument("--prompts", required=True, type=existing_file,
                   help="prompts table (parquet, rlmeta.tables.PROMPTS)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (replaced atomically)")
    add_settings(p, "settings", WarmstartSettings, "the experiment's warmstart block")
    p.add_argument("--backend", choices=["torch", "mlx"], required=True, help="backend of the SFT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template-kwargs", type=chat_template_kwargs_type, default={},
                   help="the experiment's train.chat_template_kwargs (JSON), so that the prompts are RL's")
    return lambda a: warmstart(a.model, a.prompts, a.out, a.settings, a.seed, a.backend, a.chat_template_kwargs)
