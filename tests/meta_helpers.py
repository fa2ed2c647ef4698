"""Test helpers for the FOMAML tests: a tiny Qwen3 checkpoint and tiny MATH task tables.

Uses ``rlmeta.models.build.build_tiny_model`` when it exists, otherwise makes its
own tiny Qwen3 with a byte-level BPE tokenizer trained on the task text.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from rlmeta.io import write_table
from rlmeta.tables import PROBLEMS

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SUBJECTS = ["algebra", "geometry", "number_theory"]


def _problem(subject: str, i: int, split: str) -> dict:
    a, b = i + 2, (i * 3) % 7 + 1
    ops = {"algebra": ("+", a + b), "geometry": ("*", a * b), "number_theory": ("-", a - b)}
    op, ans = ops.get(subject, ("+", a + b))
    return dict(problem_id=f"{subject}/{split}/{i}", source="math", split=split, subject=subject, level=1,
                question=f"What is {a} {op} {b}?", solution=f"We get {a} {op} {b} = \\boxed{{{ans}}}.",
                answer=str(ans))


def make_tasks(root: Path, subjects=SUBJECTS, sizes=(6, 6, 6)) -> Path:
    """Write ``<root>/<subject>/{support,query,heldout}.parquet`` of tiny arithmetic problems."""
    for s_i, subject in enumerate(subjects):
        start = 0
        for split, n in zip(("support", "query", "heldout"), sizes):
            rows = [_problem(subject, start + j + 10 * s_i, split) for j in range(n)]
            start += n
            write_table(root / subject / f"{split}.parquet", pa.Table.from_pylist(rows, schema=PROBLEMS), PROBLEMS)
    return root


def make_tiny_model(out: Path, corpus: list[str] | None = None, seed: int = 0, vocab_size: int = 320) -> Path:
    """Save a tiny Qwen3 (hidden 64, 2 layers) plus tokenizer with a chat template to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = corpus or [_problem(s, i, "x")[k] for s in SUBJECTS for i in range(40) for k in ("question", "solution")]
    corpus = corpus + ["system user assistant Solve step by step; put the final answer in \\boxed{}."]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=512, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def tiny_model(out: Path, seed: int = 0) -> Path:
    """A tiny model directory built by ``build_tiny_model`` on the tiny problems' text."""
    import json

    try:
        from rlmeta.models.build import build_tiny_model
    except ImportError:
        return make_tiny_model(out, seed=seed)
    corpus = out.parent / f"{out.name}_corpus.jsonl"
    with open(corpus, "w") as fh:
        for s in SUBJECTS:
            for i in range(40):
                r = _problem(s, i, "x")
                fh.write(json.dumps({"problem": r["question"], "solution": r["solution"]}) + "\n")
    build = {"tokenizer": "bpe", "vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}
    return build_tiny_model(out, build, [corpus], seed)
