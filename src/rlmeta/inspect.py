"""Try a checkpoint by hand: render a template over your prompts, sample completions on either
backend, and score them with the experiment's rewards (seed 000's "test the trained model").

``inspect_model`` returns one row per completion; ``format_rows`` prints them as a table of
rewards followed by the completions. ``rlmeta inspect`` is the command line and
``notebooks/inspect_model.ipynb`` the notebook version.
"""
from __future__ import annotations

import argparse
import json
import logging
import textwrap
import time
from pathlib import Path

from rlmeta.prompts import TEMPLATES, get_template
from rlmeta.scoring import score

log = logging.getLogger(__name__)


def _row(text_or_row, template: str) -> dict:
    if isinstance(text_or_row, dict):
        return text_or_row
    return {"title": text_or_row, "summary": None} if template == "inner_scientist" else {"question": text_or_row}


def render(items, template: str, reference: str | None = None) -> list[tuple[list[dict], str | None]]:
    """(messages, reference) per item: a question/headline string, a problem or headline row, or
    a prompts-table row (its ``prompt`` messages are used as they are)."""
    tpl = get_template(template)
    out = []
    for item in items:
        row = _row(item, template)
        msgs = list(row["prompt"]) if row.get("prompt") is not None else tpl(row)
        ref = row.get("reference", row.get("answer", reference))
        out.append(([{"role": m["role"], "content": m["content"]} for m in msgs], None if ref is None else str(ref)))
    return out


def load_prompts_file(path: str | Path, max_prompts: int | None = None) -> list:
    """Rows of a parquet table (prompts: eval split first; problems; headlines) or of a jsonl file
    (objects with question/answer, title/summary or prompt/reference, or bare strings)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        if rows and "split" in rows[0] and "prompt" in rows[0]:
            rows = [r for r in rows if r["split"] == "eval"] + [r for r in rows if r["split"] != "eval"]
    else:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(line.strip())
    return rows[:max_prompts] if max_prompts else rows


def inspect_model(model, backend: str, prompts: list[tuple[list[dict], str | None]], rewards: dict[str, float],
                  params: dict | None = None, samples: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                  max_new_tokens: int = 128, seed: int = 0, chat_template_kwargs: dict | None = None,
                  **shaping) -> list[dict]:
    """Generate ``samples`` completions per (messages, reference) and score each (``shaping``: top_k, min_p,
    repetition_penalty, as ``Policy.generate``; ``chat_template_kwargs``: the chat template's, as
    ``train.chat_template_kwargs``; None = a loaded policy's own, none for a path).

    ``model``: a checkpoint path / hub id (loaded on ``backend``) or an already loaded Policy.
    Rows: prompt_index, sample_idx, question, reference, completion, n_tokens, finish_reason,
    reward and one key per reward component.
    """
    if isinstance(model, (str, Path)):
        from rlmeta.policy import load_policy

        t0 = time.perf_counter()
        path, model = model, load_policy(model, backend, chat_template_kwargs=chat_template_kwargs)
        log.info("loaded %s on %s in %.1fs", path, backend, time.perf_counter() - t0)
    from rlmeta.policy.base import encode_prompts

    kwargs = getattr(model, "chat_template_kwargs", {}) if chat_template_kwargs is None else chat_template_kwargs
    ids = encode_prompts(model.tokenizer, [m for m, _ in prompts], kwargs)
    gens = model.generate(ids, n=samples, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, seed=seed, **shaping)
    s = score([g.text for g in gens], [prompts[g.prompt_index][1] for g in gens],
              [prompts[g.prompt_index][0] for g in gens], rewards, params)
    rows = []
    for k, g in enumerate(gens):
        msgs, ref = prompts[g.prompt_index]
        question = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        rows.append({"prompt_index": g.prompt_index, "sample_idx": g.sample_idx, "question": question,
                     "reference": ref, "completion": g.text, "n_tokens": len(g.token_ids),
                     "finish_reason": g.finish_reason, "reward": float(s.total[k]),
                     **{n: float(v[k]) for n, v in s.components.items()}})
    return rows


def format_rows(rows: list[dict], rewards: dict[str, float], width: int = 100) -> str:
    """A reward table (one line per completion, then the means) followed by every completion."""
    names = list(rewards)
    cols = ["prompt", "sample", "tokens", "finish", "reward"] + names
    widths = [max(len(c), 7) for c in cols]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))
    out = [line(cols), line(["-" * w for w in widths])]
    for r in rows:
        out.append(line([r["prompt_index"], r["sample_idx"], r["n_tokens"], r["finish_reason"], f"{r['reward']:.3f}"]
                        + [f"{r[n]:.3f}" for n in names]))
    if rows:
        mean = lambda k: sum(r[k] for r in rows) / len(rows)
        out.append(line(["mean", "", f"{mean('n_tokens'):.1f}", "", f"{mean('reward'):.3f}"]
                        + [f"{mean(n):.3f}" for n in names]))
    out.append("weights: " + ", ".join(f"{n}={w:g}" for n, w in rewards.items()))
    seen = set()
    for r in rows:
        if r["prompt_index"] not in seen:
            seen.add(r["prompt_index"])
            question = textwrap.shorten(r["question"].split("\n\n")[0], width - 12)
            out += ["", "=" * width, f"prompt {r['prompt_index']}: {question}"]
            if r["reference"] is not None:
                out.append(f"reference: {r['reference']}")
        out += [f"--- sample {r['sample_idx']} · reward {r['reward']:.3f} · {r['n_tokens']} tokens · "
                f"{r['finish_reason']}"]
        lines = [textwrap.fill(p, width, replace_whitespace=False) if p else "" for p in r["completion"].splitlines()]
        out += lines or ["(empty)"]
    return "\n".join(out)


def command(p: argparse.ArgumentParser):
    """``rlmeta inspect``: generate with any checkpoint on either backend and print the completions with rewards."""
    from rlmeta.cli import chat_template_kwargs_type, model_ref, settings_type
    from rlmeta.settings import RewardMix

    p.add_argument("--model", required=True, type=model_ref,
                   help="checkpoint folder (e.g. results/<exp>/seed<N>/checkpoints/final) or hub id")
    p.add_argument("--backend", choices=["mlx", "torch"], default="torch")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a question or headline (repeatable)")
    src.add_argument("--prompts-file", help="parquet (prompts, problems or headlines table) or jsonl of questions")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="xml_cot")
    p.add_argument("--rewards", type=settings_type(RewardMix, "rewards"),
                   help='{"rewards": {name: weight}, "reward_params": {...}} (default: the template\'s rewards)')
    p.add_argument("--reference", help="gold answer for the --prompt questions")
    p.add_argument("--max-prompts", type=int, default=8, help="prompts taken from --prompts-file (default 8)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (default 1: off)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat-template-kwargs", type=chat_template_kwargs_type, default={},
                   help='chat template keyword arguments, as train.chat_template_kwargs (e.g. '
                        '\'{"enable_thinking": false}\' for Qwen3; default none)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per completion instead of the table")

    def run(a):
        mix = a.rewards or RewardMix(rewards=TEMPLATES[a.template].default_rewards)
        items = a.prompt if a.prompt else load_prompts_file(a.prompts_file, a.max_prompts)
        prompts = render(items, a.template, a.reference)
        rows = inspect_model(a.model, a.backend, prompts, mix.rewards, mix.reward_params, a.samples, a.temperature,
                             a.top_p, a.max_new_tokens, a.seed, chat_template_kwargs=a.chat_template_kwargs,
                             top_k=a.top_k, min_p=a.min_p,
                             repetition_penalty=a.repetition_penalty)
        if a.json:
            print("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        else:
            print(format_rows(rows, mix.rewards))
    return run
