"""Warm start: supervised fine-tuning on the prompts table's reference completions, so the
base policy already emits the expected format before RL.

Each train row with a ``reference_completion`` becomes ``chat_template(prompt,
add_generation_prompt=True) + reference_completion + "<|im_end|>"``; prompt and completion are
tokenized separately (as at generation time) and the loss is the mean cross-entropy over
completion tokens only. AdamW (bias-corrected on both backends, weight decay 0), gradient
norm clipped at 1.0, cosine decay from ``learning_rate`` to 10% of it, batches drawn from
seeded permutations. The output is a checkpoint folder in the input's format plus
``warmstart_metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from rlmeta.io import atomic_dir, read_table
from rlmeta.models.hub import hub_errors, is_hub_id
from rlmeta.tables import PROMPTS

log = logging.getLogger(__name__)

END = "<|im_end|>"
METRICS = "warmstart_metrics.json"
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")
MAX_GRAD_NORM = 1.0


def sft_examples(tokenizer, prompts_table_path: str | Path,
                 max_seq_len: int) -> tuple[list[tuple[list[int], int]], int]:
    """``([(token_ids, n_prompt_tokens), ...], n_skipped)`` for the train rows with a reference
    completion; sequences are cut to ``max_seq_len``, rows left without completion tokens skipped."""
    rows = read_table(prompts_table_path, PROMPTS).to_pylist()
    out, skipped = [], 0
    for r in rows:
        if r["split"] != "train" or r["reference_completion"] is None:
            continue
        text = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        c = tokenizer(r["reference_completion"] + END, add_special_tokens=False)["input_ids"]
        if len(p) >= max_seq_len:
            skipped += 1
            continue
        out.append(((p + c)[:max_seq_len], len(p)))
    if not out:
        raise ValueError(f"{prompts_table_path}: no train rows with a reference_completion fit in "
                         f"max_seq_len={max_seq_len} ({skipped} prompts too long)")
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


def lr_at(step: int, steps: int, learning_rate: float) -> float:
    """Cosine decay from ``learning_rate`` (step 0) towards 10% of it."""
    return learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def _local_dir(model_dir: str | Path) -> Path:
    """The local folder of a checkpoint (a hub id is fetched through the hub cache)."""
    if not is_hub_id(model_dir):
        return Path(model_dir)
    with hub_errors(str(model_dir)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_dir)))


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights and metrics)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name != METRICS and not any(f.match(p) for p in _WEIGHTS):
            shutil.copy(f, dst / f.name)


def _train_torch(src: Path, tmp: Path, data, steps: int, learning_rate: float, seed: int,
                 log_every: int) -> tuple[list[float], float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", trust_remote_code=False).to(device)
    model.train()
    log.info("warmstart[torch] on %s", device)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for step, (x, y, m) in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, learning_rate)
        # Right padding under a causal mask: real tokens never see the pads, so no attention_mask.
        logits = model(input_ids=torch.from_numpy(x).long().to(device)).logits.float()
        targets = torch.from_numpy(y).long().flatten().to(device)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        mask = torch.from_numpy(m).flatten().to(device)
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
        _progress("torch", step, steps, losses, t0, log_every)
    seconds = time.perf_counter() - t0
    model.eval().cpu().save_pretrained(tmp, safe_serialization=True)
    return losses, seconds


def _train_mlx(src: Path, tmp: Path, data, steps: int, learning_rate: float, seed: int,
               log_every: int) -> tuple[list[float], float]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.utils import save_model

    mx.random.seed(seed)
    model, _ = mlx_lm.load(str(src))
    model.train()

    def loss_fn(model, x, y, m):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="none")
        return (ce * m).sum() / m.sum()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, bias_correction=True)
    losses, t0 = [], time.perf_counter()
    for step, (x, y, m) in enumerate(data):
        opt.learning_rate = lr_at(step, steps, learning_rate)
        loss, grads = value_and_grad(model, mx.array(x), mx.array(y), mx.array(m))
        grads, _ = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
        _progress("mlx", step, steps, losses, t0, log_every)
    seconds = time.perf_counter() - t0
    model.eval()
    save_model(tmp, model)
    return losses, seconds


def _progress(backend: str, step: int, steps: int, losses: list[float], t0: float, every: int) -> None:
    if (step + 1) % every == 0 or step + 1 == steps:
        log.info("warmstart[%s] step %d/%d loss %.4f (%.3f s/step)", backend, step + 1, steps, losses[-1],
                 (time.perf_counter() - t0) / (step + 1))


def warmstart(model_dir: str | Path, prompts_table_path: str | Path, out_dir: str | Path, steps: int,
              batch_size: int, learning_rate: float, max_seq_len: int, seed: int, backend: str = "torch") -> Path:
    """Fine-tune ``model_dir`` on reference completions for ``steps`` optimizer steps and write the
    checkpoint to ``out_dir`` (atomically); ``steps == 0`` copies the model unchanged.

    ``warmstart_metrics.json`` holds per-step ``losses``, ``initial_loss`` (the first batch, before
    any update), ``final_loss`` (mean of the last max(1, steps // 10) steps) and ``seconds_per_step`` (the training
    loop alone, without loading and saving).
    """
    if backend not in ("torch", "mlx"):
        raise ValueError(f"unknown backend {backend!r}; expected torch or mlx")
    src = _local_dir(model_dir)
    metrics = dict(backend=backend, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                   max_seq_len=max_seq_len, seed=seed, model=str(model_dir), losses=[])
    with atomic_dir(out_dir) as tmp:
        if steps > 0:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src)
            examples, skipped = sft_examples(tok, prompts_table_path, max_seq_len)
            data = batches(examples, batch_size, steps, seed, tok.pad_token_id if tok.pad_token_id is not None else 0)
            train = _train_torch if backend == "torch" else _train_mlx
            losses, seconds = train(src, tmp, data, steps, learning_rate, seed, max(1, steps // 10))
            tail = losses[-max(1, steps // 10):]
            metrics.update(losses=losses, initial_loss=losses[0], final_loss=sum(tail) / len(tail),
                           n_examples=len(examples), n_skipped=skipped, seconds=seconds, seconds_per_step=seconds / steps)
            log.info("warmstart[%s]: loss %.3f -> %.3f over %d steps, %.3f s/step", backend, losses[0],
                     metrics["final_loss"], steps, seconds / steps)
        else:
            for f in sorted(src.iterdir()):
                if f.is_file() and any(f.match(p) for p in _WEIGHTS):
                    shutil.copy(f, tmp / f.name)
        _copy_non_weights(src, tmp)  # the source's config and tokenizer files, byte for byte
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    """Command line for ``warmstart``."""
    p = argparse.ArgumentParser(description="Warm-start (SFT) a checkpoint on a prompts table's reference completions.")
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    p.add_argument("--prompts", required=True, type=Path, help="prompts table (parquet, rlmeta.tables.PROMPTS)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warmstart(a.model, a.prompts, a.out, a.steps, a.batch_size, a.lr, a.max_seq_len, a.seed, a.backend)
