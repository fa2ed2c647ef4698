"""Prompt templates (chat messages), SFT reference completions and the prompts table.

Every template turns one input row (a headline or a problem) into a system plus
a user message. ``TEMPLATES[name](row)`` gives the messages and
``TEMPLATES[name].reference_completion(row)`` a gold completion in the format the
template asks for (used for the warm-start SFT). ``build_prompts`` makes the
``prompts`` table (schema ``rlmeta.tables.PROMPTS``) of one experiment.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyarrow is imported where tables are built: the config layer reads TEMPLATES at start-up
    import pyarrow as pa

log = logging.getLogger(__name__)

SECTIONS = (
    "Goal Hypothesis (g):",
    "Prior Knowledge (K):",
    "Reward Model (theta):",
    "Exploration Plan (pi_probe):",
    "Prediction:",
)
"""The inner-scientist section headers, in order; the ``sections`` reward checks these."""

_SECTION_HINTS = (
    "the goal or hypothesis the headline suggests.",
    "what you already know that bears on it.",
    "how you would judge whether a hypothesis or prediction is good.",
    "what you would check next to learn more.",
    "one concrete, testable prediction.",
)

INNER_SCIENTIST_SYSTEM = (
    "You are an inner scientist. You read a news headline and reason about it as a learner "
    "who forms a hypothesis, states prior knowledge, defines how success is judged, plans "
    "how to probe the world, and commits to a prediction."
)

XML_COT_SYSTEM = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

MATH_BOXED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

REASONING_GYM_SYSTEM = "Solve the task. Put only the final answer inside <answer>...</answer>."

_TAG = re.compile(r"<[^>]+>")
_CALC = re.compile(r"<<[^>]*>>")
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_STOP = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her his how if in
    into is it its just may more most new not of on or our out over says said she so than that the their
    them then there these they this those to up was we were what when where which who why will with
    would you your after about also amid among before being between during under while der die das und
    ist mit von den dem des ein eine für auf im zu""".split()
)


def _clean(text: str | None, max_words: int | None = None) -> str:
    """Unescape HTML, drop tags, collapse whitespace, optionally keep the first words."""
    words = _TAG.sub(" ", html.unescape(text or "")).split()
    if max_words is not None and len(words) > max_words:
        return " ".join(words[:max_words]) + " ..."
    return " ".join(words)


def _messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def inner_scientist(row: dict) -> list[dict]:
    """Seed 000's meta-learning prompt over a headline's title and summary (five sections)."""
    summary = _clean(row.get("summary"), max_words=60) or "(no summary)"
    lines = "\n".join(f"{h} {hint}" for h, hint in zip(SECTIONS, _SECTION_HINTS))
    user = (
        f"Headline: {_clean(row.get('title'))}\nSummary: {summary}\n\n"
        "Think like an inner scientist about this headline. Answer with exactly these five "
        "sections, in this order, each starting on its own line with its header:\n"
        f"{lines}\nBe concise: about 40 to 200 words in all."
    )
    return _messages(INNER_SCIENTIST_SYSTEM, user)


def xml_cot(row: dict) -> list[dict]:
    """Seed 003's GSM8K prompt: reasoning and answer in XML tags."""
    return _messages(XML_COT_SYSTEM, row["question"])


def math_boxed(row: dict) -> list[dict]:
    """Step-by-step solution with the final answer in ``\\boxed{}``."""
    return _messages(MATH_BOXED_SYSTEM, row["question"])


def reasoning_gym(row: dict) -> list[dict]:
    """A reasoning-gym task's own question; the answer goes inside ``<answer>...</answer>``."""
    return _messages(REASONING_GYM_SYSTEM, row["question"])


def reasoning_gym_reference(row: dict) -> str:
    """The generator's gold answer in ``<answer>`` tags (what the warm start imitates)."""
    return f"<answer>{row['answer']}</answer>"


def reasoning_gym_key(row: dict) -> str:
    """The prompts' ``reference`` of a reasoning-gym row: JSON with what the task's own ``score_answer`` needs
    (task, question, gold answer, the entry's metadata and the task's config), read by ``rg_correct``."""
    import json

    return json.dumps({"task": row["task"], "question": row["question"], "answer": row["answer"],
                       "metadata": json.loads(row["metadata"]), "config": json.loads(row["config"])},
                      sort_keys=True, ensure_ascii=False)


def _keywords(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for w in _WORD.findall(text):
        lw = w.lower().strip("'-")
        if len(lw) > 3 and lw not in _STOP:
            seen.setdefault(lw, None)
    return list(seen)


def inner_scientist_reference(row: dict) -> str:
    """A deterministic, headline-specific completion with all five sections in order."""
    title = _clean(row.get("title")) or "this story"
    summary = _clean(row.get("summary"), max_words=25)
    kw = _keywords(f"{title} {summary}")
    kw += [w for w in ("the event", "public reaction", "official response", "new data", "the outcome") if w not in kw]
    k = kw[:5]
    body = (  # short on purpose: a tiny model must fit all five sections in ~160 tokens
        f'"{title}" suggests that {k[0]} matters.',
        f"Related context: {k[1]}, {k[2]} and {k[3]}.",
        f"A good answer explains {k[0]} and makes a testable claim about {k[1]}.",
        f"Check follow-up coverage of {k[2]} and data on {k[3]}.",
        f"More reporting on {k[0]} will confirm the claim about {k[1]}.",
    )
    return "\n".join(f"{h} {b}" for h, b in zip(SECTIONS, body))


def gsm8k_reasoning(solution: str) -> str:
    """A GSM8K solution without its ``####`` line and ``<<...>>`` calculator annotations."""
    lines = [_CALC.sub("", ln).rstrip() for ln in solution.splitlines() if not ln.lstrip().startswith("####")]
    return "\n".join(ln for ln in lines if ln.strip()).strip()


def xml_cot_reference(row: dict) -> str:
    """``<reasoning>`` with the cleaned GSM8K solution, ``<answer>`` with the gold answer."""
    return f"<reasoning>\n{gsm8k_reasoning(row['solution'])}\n</reasoning>\n<answer>\n{row['answer']}\n</answer>"


def math_boxed_reference(row: dict) -> str:
    """The MATH solution itself (it ends in ``\\boxed{...}``)."""
    return row["solution"]


@dataclass(frozen=True)
class Template:
    """A named prompt template and everything that depends on it: ``template(row)`` gives the chat
    messages; it also names its SFT reference completion, its default rewards, the task metrics the
    evaluation reports (column -> registered scorer in ``rlmeta.rewards``) and its primary accuracy.
    Adding a template touches this table only."""

    name: str
    messages: Callable[[dict], list[dict]]
    reference_completion: Callable[[dict], str]
    dataset_kind: str  # rss | gsm8k | math | reasoning_gym
    default_rewards: dict[str, float]
    metrics: dict[str, str]  # "accuracy/<name>" | "format/<name>" -> scorer name
    primary_accuracy: str | None = None  # the metric column the report leads with

    def __call__(self, row: dict) -> list[dict]:
        return self.messages(row)


TEMPLATES: dict[str, Template] = {
    "inner_scientist": Template(
        "inner_scientist", inner_scientist, inner_scientist_reference, "rss",
        default_rewards={"sections": 0.5, "length": 0.25, "coherence": 0.25},
        metrics={"format/all_sections": "all_sections"}),
    "xml_cot": Template(
        "xml_cot", xml_cot, xml_cot_reference, "gsm8k",
        default_rewards={"xml_strict": 0.5, "xml_soft": 0.25, "integer_answer": 0.25, "gsm8k_correct": 1.0},
        metrics={"accuracy/gsm8k_strict": "gsm8k_strict", "accuracy/gsm8k_flexible": "gsm8k_flexible",
                 "accuracy/gsm8k_xml": "gsm8k_xml", "format/xml_strict": "xml_strict", "format/xml_soft": "xml_soft"},
        primary_accuracy="accuracy/gsm8k_xml"),
    "math_boxed": Template(
        "math_boxed", math_boxed, math_boxed_reference, "math",
        default_rewards={"math_correct": 1.0},
        metrics={"accuracy/math_verify": "math_correct", "format/boxed_present": "boxed_present"},
        primary_accuracy="accuracy/math_verify"),
    "reasoning_gym": Template(
        "reasoning_gym", reasoning_gym, reasoning_gym_reference, "reasoning_gym",
        default_rewards={"rg_correct": 1.0, "rg_format": 0.1},
        metrics={"accuracy/rg_correct": "rg_correct", "format/rg_format": "rg_format"},
        primary_accuracy="accuracy/rg_correct"),
}


def get_template(name: str) -> Template:
    """The template called ``name``; ValueError listing the valid names otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template '{name}'; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def reference_completion(template: str, row: dict) -> str:
    """The SFT reference completion of ``row`` under template ``template``."""
    return get_template(template).reference_completion(row)


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).hexdigest()


def prompt_id(experiment: str, item_id: str) -> str:
    """Stable id of one item's prompt in one experiment."""
    return _sha(experiment, item_id)[:16]


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (for hash-based splits)."""
    return int(_sha(key)[:12], 16) / 16**12


SPLIT_MAP = {"train": "train", "support": "train", "query": "train", "test": "eval", "heldout": "eval", "eval": "eval"}
"""Problem split -> prompt split (math: train = support + query, eval = test and heldout)."""


def _rows(items: pa.Table | Iterable[pa.Table]) -> list[dict]:
    import pyarrow as pa

    tables = [items] if isinstance(items, pa.Table) else list(items)
    return [r for t in tables for r in t.to_pylist()]


def build_prompts(
    experiment_name: str,
    template: str,
    items_table: pa.Table | Iterable[pa.Table],
    *,
    eval_fraction: float = 0.25,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> pa.Table:
    """The prompts table of one experiment (schema ``PROMPTS``).

    Headlines split by a stable hash of ``headline_id`` (``eval_fraction`` to eval,
    task = headline_id); problems split by their ``split`` column through
    ``SPLIT_MAP`` (task = "gsm8k", the MATH subject or the reasoning-gym task; a reasoning-gym
    reference is the JSON of ``reasoning_gym_key``). Duplicate items are kept
    once, eval winning. Within each split, rows come in a seeded hash order that
    does not depend on input order; ``max_train``/``max_eval`` keep the first N.
    """
    tpl = get_template(template)
    kind = tpl.dataset_kind
    chosen: dict[str, tuple[str, dict]] = {}
    for row in _rows(items_table):
        if kind == "rss":
            item = row["headline_id"]
            split = "eval" if hash_fraction(item) < eval_fraction else "train"
        else:
            item = row["problem_id"]
            if row["split"] not in SPLIT_MAP:
                raise ValueError(f"problem {item}: unknown split '{row['split']}'; expected one of {sorted(SPLIT_MAP)}")
            split = SPLIT_MAP[row["split"]]
        if item not in chosen or (split == "eval" and chosen[item][0] == "train"):
            chosen[item] = (split, row)
    records = []
    for split, cap in (("train", max_train), ("eval", max_eval)):
        items = sorted((i for i, (s, _) in chosen.items() if s == split), key=lambda i: (_sha(seed, i), i))
        for item in items[:cap] if cap is not None else items:
            row = chosen[item][1]
            if kind == "rss":
                task, reference = item, None
            elif kind == "reasoning_gym":
                task, reference = row["task"], reasoning_gym_key(row)
            else:
                task = "gsm8k" if kind == "gsm8k" else (row.get("subject") or "math")
                reference = row["answer"]
            records.append(
                {
                    "prompt_id": prompt_id(experiment_name, item),
                    "experiment": experiment_name,
                    "item_id": item,
                    "task": task,
                    "split": split,
                    "prompt": tpl(row),
                    "reference": reference,
                    "reference_completion": tpl.reference_completion(row),
                }
            )
    import pyarrow as pa

    from rlmeta.tables import PROMPTS

    return pa.Table.from_pylist(records, schema=PROMPTS)


def train_rows(path, max_prompts: int | None = None) -> list[dict]:
    """Rows of a prompts table's train split (``prompt_id``, ``task``, ``prompt``, ``reference``), the first
    ``max_prompts`` of them: what both RL trainers train on."""
    from rlmeta.errors import UserError
    from rlmeta.io import read_table

    table = read_table(path).select(["prompt_id", "task", "split", "prompt", "reference"])
    rows = [r for r in table.to_pylist() if r["split"] == "train"]
    if not rows:
        raise UserError(f"{path}: no rows with split == 'train'")
    return rows[:max_prompts] if max_prompts else rows


def eval_rows(path, n: int | None = None) -> list[dict]:
    """The first ``n`` rows of a prompts table's eval split (``prompt_id``, ``task``, ``prompt``, ``reference``),
    in table order: the held-out prompts of the evaluations during training. Empty when there is no eval split."""
    from rlmeta.io import read_table

    table = read_table(path).select(["prompt_id", "task", "split", "prompt", "reference"])
    rows = [r for r in table.to_pylist() if r["split"] == "eval"]
    return rows[:n] if n else rows


def command(p: argparse.ArgumentParser):
    """``rlmeta make-prompts``: build an experiment's prompts table from headlines or problem tables."""
    from rlmeta.cli import default_of, existing_file, help_of
    from rlmeta.settings import RSSDataset

    p.add_argument("--experiment", required=True, help="experiment name (part of prompt_id)")
    p.add_argument("--template", required=True, choices=sorted(TEMPLATES))
    p.add_argument("--inputs", nargs="+", required=True, type=existing_file,
                   help="headlines or problems parquet file(s)")
    p.add_argument("--out", required=True, help="output prompts parquet")
    p.add_argument("--eval-fraction", type=float, default=default_of(RSSDataset, "eval_fraction"),
                   help=help_of(RSSDataset, "eval_fraction"))
    p.add_argument("--seed", type=int, default=0, help="seed of the row order and caps")
    p.add_argument("--max-train", type=int, help="keep at most N train prompts")
    p.add_argument("--max-eval", type=int, help="keep at most N eval prompts")

    def run(a):
        from rlmeta.io import read_table, write_table
        from rlmeta.tables import PROMPTS

        t0 = time.perf_counter()
        tables = [read_table(path) for path in a.inputs]
        table = build_prompts(a.experiment, a.template, tables, eval_fraction=a.eval_fraction, seed=a.seed,
                              max_train=a.max_train, max_eval=a.max_eval)
        write_table(a.out, table, PROMPTS)
        splits = table.column("split").to_pylist()
        log.info("%s: %d prompts (train %d, eval %d, tasks %d) from %d input rows -> %s in %.2fs",
                 a.experiment, table.num_rows, splits.count("train"), splits.count("eval"),
                 len(set(table.column("task").to_pylist())), sum(t.num_rows for t in tables), a.out,
                 time.perf_counter() - t0)
    return run
