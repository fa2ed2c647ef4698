"""Few-shot adaptation on held-out problems from the base and the meta-learned initialisation.

For each subject the ``heldout`` rows are cut in two: a seeded support batch from the first
half, the second half as query. From each initialisation: query loss before adapting, the
same ``inner_steps`` SGD steps at ``inner_lr`` as meta-training on the support batch, then
the query loss and greedy-decoding accuracy (math-verify) of the adapted model. Weights
are restored exactly between subjects. With ``meta.lora`` only a LoRA adapter is adapted:
a fresh seeded one on the base (the meta run's starting point), the meta-learned one
(``<meta>/meta_adapter``) on the base for the meta initialisation.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from rlmeta.meta.distributed import DistContext
from rlmeta.meta.fomaml import ADAPTER_DIR, batch_loss, meta_parameters, restore, sgd_step, snapshot
from rlmeta.meta.tasks import TaskSampler, collate, encode, load_tasks, messages
from rlmeta.settings import LoraSettings, MetaSettings

log = logging.getLogger(__name__)


def split_heldout(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(support pool = first half, query = second half) of a subject's heldout rows."""
    if len(rows) < 2:
        raise ValueError(f"need at least 2 heldout rows per subject, got {len(rows)}")
    half = len(rows) // 2
    return rows[:half], rows[half:]


def load_init(path: str, base: str, lora: LoraSettings | None, seed: int, device):
    """(tokenizer, model) of one initialisation; with ``lora`` a trainable adapter over ``base``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if lora is None:
        return tok, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    from peft import PeftModel, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    adapter = Path(path) / ADAPTER_DIR
    if adapter.exists():
        return tok, PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    if path != base:
        log.warning("%s has no %s/: adapting a fresh adapter on the merged model", path, ADAPTER_DIR)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    from rlmeta.policy.lora import peft_config

    torch.manual_seed(seed)  # the adapter the meta run started from
    return tok, get_peft_model(model, peft_config(lora))


@torch.no_grad()
def query_loss(model, examples: list, pad_id: int, batch: int, ctx: DistContext) -> float:
    """Token-mean solution loss over all ``examples`` (in batches)."""
    model.eval()
    total = tokens = 0.0
    for i in range(0, len(examples), batch):
        _, value, n = batch_loss(model, collate(examples[i:i + batch], pad_id), ctx)
        total, tokens = total + value * n, tokens + n
    return total / max(tokens, 1.0)


@torch.no_grad()
def greedy(model, tok, rows: list[dict], max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy completions of the rows' ``math_boxed`` prompts (left-padded batches)."""
    model.eval()
    tok.padding_side = "left"
    eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if i is not None and i >= 0]
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch):
        prompts = [tok.apply_chat_template(messages(r), tokenize=False, add_generation_prompt=True)
                   for r in rows[i:i + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def correctness(pairs: list[tuple[str, str]]) -> list[float]:
    """1.0/0.0 per (completion, answer): the ``math_correct`` scorer (math-verify in worker processes)."""
    from rlmeta.rewards import REGISTRY

    if not pairs:
        return []
    return REGISTRY["math_correct"].score([c for c, _ in pairs], [a for _, a in pairs]).tolist()


def evaluate_init(path: str, base: str, heldout: dict[str, list[dict]], cfg: MetaSettings, seed: int,
                  max_new_tokens: int) -> dict[str, dict]:
    """Per subject: ``pre_adapt_loss``, ``query_loss`` (after adapting), greedy ``completions``
    of the query problems and their ``answers``."""
    ctx = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tok, model = load_init(path, base, cfg.lora, seed, ctx.device)
    params = meta_parameters(model)
    theta = snapshot(params)
    sampler = TaskSampler(list(heldout), seed)
    out = {}
    for subject, rows in heldout.items():
        pool, query_rows = split_heldout(rows)
        enc = lambda r: encode(tok, r, cfg.max_seq_len)
        query = [enc(r) for r in query_rows]
        support = collate([enc(pool[i]) for i in sampler.rows(0, 0, subject, "heldout", len(pool), cfg.support_batch)],
                          tok.pad_token_id)
        pre = query_loss(model, query, tok.pad_token_id, cfg.query_batch, ctx)
        model.train()
        for _ in range(cfg.inner_steps):
            loss, _, _ = batch_loss(model, support, ctx)
            loss.backward()
            sgd_step(params, cfg.inner_lr)
        post = query_loss(model, query, tok.pad_token_id, cfg.query_batch, ctx)
        completions = greedy(model, tok, query_rows, max_new_tokens)
        restore(params, theta)
        out[subject] = {"pre_adapt_loss": pre, "query_loss": post, "completions": completions,
                        "answers": [r["answer"] for r in query_rows]}
        log.info("%s %s: query loss %.4f -> %.4f after %d inner steps", path, subject, pre, post, cfg.inner_steps)
    return out


def evaluate(base: str, meta_dir: str, tasks_dir: str, subjects: list[str], cfg: MetaSettings, seed: int,
             max_new_tokens: int) -> dict:
    """The ``{"adaptation": ...}`` summary comparing base and meta-learned initialisations."""
    heldout = load_tasks(tasks_dir, subjects, "heldout")
    b = evaluate_init(base, base, heldout, cfg, seed, max_new_tokens)
    m = evaluate_init(meta_dir, base, heldout, cfg, seed, max_new_tokens)
    pairs = [(c, a) for r in (b, m) for s in subjects for c, a in zip(r[s]["completions"], r[s]["answers"])]
    scores = iter(correctness(pairs))
    for r in (b, m):
        for s in subjects:
            n = len(r[s]["answers"])
            r[s]["accuracy"], r[s]["n_query"] = sum(next(scores) for _ in range(n)) / n, n
    per = {s: {"base_query_loss": b[s]["query_loss"], "meta_query_loss": m[s]["query_loss"],
               "base_accuracy": b[s]["accuracy"], "meta_accuracy": m[s]["accuracy"],
               "base_pre_adapt_loss": b[s]["pre_adapt_loss"], "meta_pre_adapt_loss": m[s]["pre_adapt_loss"],
               "n_query": b[s]["n_query"]} for s in subjects}
    mean = lambda k: sum(p[k] for p in per.values()) / len(per)
    return {"adaptation": {
        "base_init_query_loss": mean("base_query_loss"), "meta_init_query_loss": mean("meta_query_loss"),
        "base_init_accuracy": mean("base_accuracy"), "meta_init_accuracy": mean("meta_accuracy"),
        "base_init_pre_adapt_loss": mean("base_pre_adapt_loss"),
        "meta_init_pre_adapt_loss": mean("meta_pre_adapt_loss"),
        "per_subject": per,
        "settings": {"inner_steps": cfg.inner_steps, "inner_lr": cfg.inner_lr, "support_batch": cfg.support_batch,
                     "lora": cfg.lora is not None, "max_new_tokens": max_new_tokens, "seed": seed},
    }}


def command(p: argparse.ArgumentParser):
    """``rlmeta eval-adaptation``."""
    from rlmeta.cli import add_settings, existing_dir, existing_file, model_ref

    p.add_argument("--base", required=True, type=model_ref, help="the initial checkpoint the meta run started from")
    p.add_argument("--meta", required=True, type=existing_dir, help="the meta-learned checkpoint (train-fomaml --out)")
    p.add_argument("--tasks-dir", required=True, type=existing_dir, help="folder with <subject>/heldout.parquet")
    p.add_argument("--subjects", nargs="+", required=True)
    add_settings(p, "settings", MetaSettings, "the experiment's meta block (the inner-loop settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy completion length of the accuracy check")
    p.add_argument("--provenance", type=existing_file, help="the experiment's provenance.json (embedded)")
    p.add_argument("--out", required=True, help="output JSON")

    def run(a):
        from rlmeta.io import write_json

        t0 = time.perf_counter()
        summary = evaluate(a.base, str(a.meta), a.tasks_dir, a.subjects, a.settings, a.seed, a.max_new_tokens)
        if a.provenance:
            summary["provenance"] = json.loads(Path(a.provenance).read_text())
        write_json(a.out, summary)
        s = summary["adaptation"]
        log.info("post-adaptation query loss: base %.4f, meta %.4f; accuracy base %.3f, meta %.3f (%.1fs) -> %s",
                 s["base_init_query_loss"], s["meta_init_query_loss"], s["base_init_accuracy"],
                 s["meta_init_accuracy"], time.perf_counter() - t0, a.out)
    return run
