"""Few-shot adaptation episodes on held-out subjects: the base initialisation against every trained method.

Two groups of subjects are evaluated, and reported apart:

- ``test``: the ``meta.test_subjects``, which no method trained on; an episode draws its support
  and query problems from all of the subject's rows;
- ``train_rows``: the training subjects' ``heldout`` rows (meta-training samples only their
  support and query rows).

Per subject ``eval_episodes`` episodes: a seeded support set (``support_batch`` rows) and a
disjoint query set (``eval_query`` rows), the same for every method. From each initialisation the
query loss after k = 0, 1, ..., K plain SGD steps at ``inner_lr`` on the support set (the
adaptation curve; ``pre_loss`` at k = 0, ``post_loss`` at k = ``inner_steps``), and greedy answers
of the adapted model (math-verify accuracy); the weights are restored exactly after each episode.
The unit of every interval is the episode: 95% percentile bootstrap of the mean
(``rlmeta.evaluation.stats.paired_bootstrap``), and paired differences between methods on the
same episodes. With ``meta.lora`` only a LoRA adapter is adapted: a fresh seeded one on the base
(the meta run's starting point), each trained adapter (``<checkpoint>/meta_adapter``) on the base.
The trained methods' budgets (outer steps, gradient passes, tokens) are read from their
train_metrics and must be equal.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from rlmeta.meta.distributed import DistContext
from rlmeta.meta.fomaml import ADAPTER_DIR, batch_loss, meta_parameters, restore, sgd_step, snapshot
from rlmeta.meta.tasks import collate, encode, episode, load_tasks, messages
from rlmeta.settings import LoraSettings, MetaSettings

log = logging.getLogger(__name__)

GROUPS = ("test", "train_rows")
"""Subject groups of the evaluation: the held-out subjects, the held-out rows of the training subjects."""
BASE = "base"


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


def pools(tasks_dir: str, train_subjects: list[str], cfg: MetaSettings) -> dict[str, dict[str, list[dict]]]:
    """Group -> subject -> the rows its episodes draw from."""
    test = {s: [] for s in cfg.test_subjects}
    for split in ("support", "query", "heldout"):
        for s, rows in load_tasks(tasks_dir, list(cfg.test_subjects), split).items():
            test[s] += rows
    return {"test": test, "train_rows": load_tasks(tasks_dir, list(train_subjects), "heldout")}


def episodes(groups: dict[str, dict[str, list[dict]]], cfg: MetaSettings, seed: int) -> list[dict]:
    """Every episode: group, subject, index, support and query rows (seeded; the same for every method)."""
    out = []
    for group, subjects in groups.items():
        for s, rows in subjects.items():
            for e in range(cfg.eval_episodes):
                sup, qry = episode(seed, "eval", s, e, len(rows), cfg.support_batch, cfg.eval_query)
                out.append({"group": group, "subject": s, "episode": e, "support": [rows[i] for i in sup],
                            "query": [rows[i] for i in qry],
                            "accuracy": cfg.accuracy_episodes is None or e < cfg.accuracy_episodes})
    return out


def run_episodes(path: str, base: str, eps: list[dict], cfg: MetaSettings, seed: int,
                 max_new_tokens: int) -> list[dict]:
    """One initialisation on every episode: ``curve`` (query loss after k = 0..K SGD steps) and, where the
    episode measures accuracy, the adapted model's greedy ``completions`` (after ``inner_steps`` steps)."""
    ctx = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tok, model = load_init(path, base, cfg.lora, seed, ctx.device)
    params = meta_parameters(model)
    theta = snapshot(params)
    enc = lambda r: encode(tok, r, cfg.max_seq_len)
    out = []
    for ep in eps:
        query = [enc(r) for r in ep["query"]]
        support = collate([enc(r) for r in ep["support"]], tok.pad_token_id)
        curve, completions = [query_loss(model, query, tok.pad_token_id, cfg.query_batch, ctx)], None
        for k in range(1, cfg.adaptation_steps + 1):
            model.train()
            loss, _, _ = batch_loss(model, support, ctx)
            loss.backward()
            sgd_step(params, cfg.inner_lr)
            curve.append(query_loss(model, query, tok.pad_token_id, cfg.query_batch, ctx))
            if k == cfg.inner_steps and ep["accuracy"]:
                completions = greedy(model, tok, ep["query"], max_new_tokens)
        restore(params, theta)
        out.append({"curve": curve, "completions": completions})
    return out


def _ci(values, resamples: int, seed: int) -> dict:
    from rlmeta.evaluation.stats import paired_bootstrap

    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    mean, low, high = paired_bootstrap(vals, resamples, seed)
    return {"mean": mean, "ci95": [low, high], "n": len(vals)}


def compute_budget(metrics: str | Path) -> dict:
    """A trained method's budget from its train_metrics: outer steps, gradient passes and tokens in them."""
    import pyarrow.parquet as pq

    t = pq.read_table(metrics)
    for col in ("grad_passes", "train_tokens"):
        if col not in t.column_names:
            raise ValueError(f"{metrics} has no {col} column: train it again with this version")
    return {"outer_steps": t.num_rows, "grad_passes": int(sum(t.column("grad_passes").to_pylist())),
            "train_tokens": int(sum(t.column("train_tokens").to_pylist()))}


def validation_curve(metrics: str | Path) -> list[dict]:
    """The meta-validation rows of a train_metrics table (steps with val/query_loss_post)."""
    import pyarrow.parquet as pq

    t = pq.read_table(metrics)
    if "val/query_loss_post" not in t.column_names:
        return []
    return [{"step": r["step"], "pre_loss": r["val/query_loss_pre"], "post_loss": r["val/query_loss_post"]}
            for r in t.select(["step", "val/query_loss_pre", "val/query_loss_post"]).to_pylist()
            if r["val/query_loss_post"] is not None]


def conclusion(ad: dict, main: str) -> str:
    """One sentence: which method adapts best on the unseen subjects, and whether ``main`` beats multitask."""
    methods = [m for m in ad["methods"] if ad[m]["test"]["post_loss"]["n"]]
    if not methods:
        return "No held-out subjects were evaluated (meta.test_subjects is empty)."
    best = min(methods, key=lambda m: ad[m]["test"]["post_loss"]["mean"])
    p = ad[best]["test"]["post_loss"]
    text = (f"On the unseen subjects ({', '.join(ad['test_subjects'])}) {best} adapts best: post-adaptation query "
            f"loss {p['mean']:.4f} [95% CI {p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] over {p['n']} episodes")
    key = f"{main} - multitask"
    d = ad["paired"].get(key, {}).get("test", {}).get("post_loss")
    if d is not None and d["n"]:
        lo, hi = d["ci95"]
        verdict = ("below" if hi < 0 else "above" if lo > 0 else "not distinguishable from")
        text += (f"; {main}'s post-adaptation loss is {verdict} multitask's ({main} − multitask "
                 f"{d['mean']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}])")
    return text + "."


def evaluate(base: str, trained: dict[str, str], tasks_dir: str, subjects: list[str], cfg: MetaSettings, seed: int,
             max_new_tokens: int, metrics: dict[str, str] | None = None, resamples: int = 2000) -> dict:
    """The ``{"adaptation": ...}`` summary: the base initialisation and each trained method (method ->
    checkpoint; ``subjects``: the training subjects) on the same episodes. ``metrics`` (method ->
    train_metrics) gives the compute budgets, which must agree, and the meta-validation curves."""
    held = sorted(set(subjects) & set(cfg.test_subjects))
    if held:
        raise ValueError(f"subjects {held} are meta.test_subjects; pass the training subjects")
    metrics = metrics or {}
    budgets = {m: compute_budget(p) for m, p in metrics.items() if m in trained}
    if len({json.dumps(b, sort_keys=True) for b in budgets.values()}) > 1:
        raise ValueError(f"the trained methods' budgets differ (equal compute is required): {budgets}")
    groups = pools(tasks_dir, subjects, cfg)
    eps = episodes(groups, cfg, seed)
    inits = {BASE: base, **trained}
    results = {m: run_episodes(p, base, eps, cfg, seed, max_new_tokens) for m, p in inits.items()}
    pairs = [(c, a) for m in inits for ep, r in zip(eps, results[m]) if r["completions"] is not None
             for c, a in zip(r["completions"], [q["answer"] for q in ep["query"]])]
    scores = iter(correctness(pairs))
    for m in inits:
        for r in results[m]:
            r["accuracy"] = (None if r["completions"] is None else
                             sum(next(scores) for _ in r["completions"]) / len(r["completions"]))
    k = cfg.inner_steps
    per_ep = {m: [{"pre_loss": r["curve"][0], "post_loss": r["curve"][k], "gain": r["curve"][0] - r["curve"][k],
                   "accuracy": r["accuracy"], "curve": r["curve"]} for r in results[m]] for m in inits}
    quantities = ("pre_loss", "post_loss", "gain", "accuracy")

    def block(m: str, idx: list[int]) -> dict:
        rows = [per_ep[m][i] for i in idx]
        out = {q: _ci([r[q] for r in rows], resamples, seed) for q in quantities}
        out["curve"] = [_ci([r["curve"][j] for r in rows], resamples, seed) for j in range(cfg.adaptation_steps + 1)]
        return out

    index = {g: [i for i, ep in enumerate(eps) if ep["group"] == g] for g in GROUPS}
    ad: dict = {"method": cfg.method, "methods": list(inits), "test_subjects": list(cfg.test_subjects),
                "train_subjects": list(subjects), "n_episodes": {g: len(v) for g, v in index.items()}}
    for m in inits:
        ad[m] = {g: block(m, index[g]) for g in GROUPS}
        ad[m].update({q: ad[m]["test"][q] for q in ("pre_loss", "post_loss", "gain", "accuracy")})
        ad[m]["compute"] = ({"outer_steps": 0, "grad_passes": 0, "train_tokens": 0} if m == BASE
                            else budgets.get(m))
        ad[m]["validation"] = validation_curve(metrics[m]) if m in metrics else []
        ad[m]["per_subject"] = {
            ep_s: {q: _ci([per_ep[m][i][q] for i, ep in enumerate(eps) if ep["subject"] == ep_s], resamples, seed)
                   ["mean"] for q in quantities}
            for ep_s in dict.fromkeys(ep["subject"] for ep in eps)}
    main = cfg.method if cfg.method in trained else next(iter(trained), BASE)
    from rlmeta.evaluation.stats import paired_bootstrap

    ad["paired"] = {}
    for other in inits:
        if other == main:
            continue
        entry = {}
        for g in GROUPS:
            entry[g] = {}
            for q in ("post_loss", "gain"):
                d = [per_ep[main][i][q] - per_ep[other][i][q] for i in index[g]]
                mean, low, high = paired_bootstrap(d, resamples, seed)
                entry[g][q] = ({"mean": mean, "ci95": [low, high], "n": len(d)} if d else
                               {"mean": None, "ci95": None, "n": 0})
        ad["paired"][f"{main} - {other}"] = entry
    ad["conclusion"] = conclusion(ad, main)
    # the headline keys of earlier versions (the summary table reads them): base and main method, unseen subjects
    ad.update({"base_init_query_loss": ad[BASE]["post_loss"]["mean"],
               "meta_init_query_loss": ad[main]["post_loss"]["mean"],
               "base_init_pre_adapt_loss": ad[BASE]["pre_loss"]["mean"],
               "meta_init_pre_adapt_loss": ad[main]["pre_loss"]["mean"],
               "base_init_accuracy": ad[BASE]["accuracy"]["mean"], "meta_init_accuracy": ad[main]["accuracy"]["mean"]})
    ad["per_subject"] = {
        s: {"base_query_loss": ad[BASE]["per_subject"][s]["post_loss"], "meta_query_loss": ad[main]["per_subject"][s]
            ["post_loss"], "base_pre_adapt_loss": ad[BASE]["per_subject"][s]["pre_loss"],
            "meta_pre_adapt_loss": ad[main]["per_subject"][s]["pre_loss"],
            "base_accuracy": ad[BASE]["per_subject"][s]["accuracy"], "meta_accuracy": ad[main]["per_subject"][s]
            ["accuracy"], "held_out_subject": s in cfg.test_subjects,
            "n_query": sum(len(ep["query"]) for ep in eps if ep["subject"] == s)}
        for s in ad[BASE]["per_subject"]}
    ad["settings"] = {"inner_steps": cfg.inner_steps, "inner_lr": cfg.inner_lr, "support_batch": cfg.support_batch,
                      "eval_query": cfg.eval_query, "eval_episodes": cfg.eval_episodes,
                      "curve_steps": cfg.adaptation_steps, "lora": cfg.lora is not None,
                      "max_new_tokens": max_new_tokens, "seed": seed, "bootstrap": resamples}
    return {"adaptation": ad}


def command(p: argparse.ArgumentParser):
    """``rlmeta eval-adaptation``."""
    from rlmeta.cli import add_settings, existing_dir, existing_file, model_ref

    p.add_argument("--base", required=True, type=model_ref, help="the initial checkpoint the methods started from")
    p.add_argument("--trained", nargs=3, action="append", default=[], metavar=("METHOD", "CHECKPOINT", "METRICS"),
                   help="a trained method: its name, final checkpoint and train_metrics.parquet (repeat per method)")
    p.add_argument("--tasks-dir", required=True, type=existing_dir,
                   help="folder with <subject>/{support,query,heldout}.parquet")
    p.add_argument("--subjects", nargs="+", required=True, help="the training subjects (none of meta.test_subjects)")
    add_settings(p, "settings", MetaSettings, "the experiment's meta block (inner loop, episodes, test subjects)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy completion length of the accuracy check")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each 95%% interval")
    p.add_argument("--provenance", type=existing_file, help="the experiment's provenance.json (embedded)")
    p.add_argument("--out", required=True, help="output JSON")

    def run(a):
        from rlmeta.io import write_json

        t0 = time.perf_counter()
        for _, ck, mt in a.trained:
            try:
                existing_dir(ck), existing_file(mt)
            except argparse.ArgumentTypeError as e:
                p.error(f"--trained: {e}")
        trained = {m: ck for m, ck, _ in a.trained}
        summary = evaluate(a.base, trained, a.tasks_dir, a.subjects, a.settings, a.seed, a.max_new_tokens,
                           {m: mt for m, _, mt in a.trained}, a.bootstrap)
        if a.provenance:
            summary["provenance"] = json.loads(Path(a.provenance).read_text())
        write_json(a.out, summary)
        ad = summary["adaptation"]
        for m in ad["methods"]:
            t = ad[m]["test"]
            log.info("%s on held-out subjects: query loss %.4f -> %.4f (gain %+.4f [%+.4f, %+.4f])", m,
                     t["pre_loss"]["mean"], t["post_loss"]["mean"], t["gain"]["mean"], *t["gain"]["ci95"])
        log.info("%s (%.1fs) -> %s", ad["conclusion"], time.perf_counter() - t0, a.out)
    return run
