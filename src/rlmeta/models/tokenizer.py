"""Tokenizers for locally built models: a byte-level BPE trained on the bundled
corpus, or the real Qwen2.5 tokenizer vendored in ``resources/qwen-tokenizer``.

Both speak the Qwen2.5 chat format (``<|im_start|>role\\n...<|im_end|>``) with
eos ``<|im_end|>`` and pad ``<|endoftext|>``. In the BPE tokenizer the three
special tokens take the first ids: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1,
``<|im_end|>`` = 2; then the 256 byte symbols, then the merges.
"""
from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

from rlmeta.settings import ROOT

QWEN_TOKENIZER_DIR = ROOT / "resources" / "qwen-tokenizer"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
# Qwen2's pre-tokenizer regex: digits split one by one, words keep a leading space or symbol.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Literal text of the workflow's prompt templates, repeated in the corpus so it merges compactly.
TEMPLATE_STRINGS = [
    "<reasoning>\n", "\n</reasoning>\n", "<answer>\n", "\n</answer>", "<reasoning>", "</reasoning>",
    "<answer>", "</answer>", "Goal Hypothesis (g):", "Prior Knowledge (K):", "Reward Model (theta):",
    "Exploration Plan (pi_probe):", "Prediction:", "\\boxed{", "$\\boxed{", "#### ",
]
TEMPLATE_REPEATS = 200
_TEXT_TAGS = {"title", "description", "summary", "subtitle", "encoded", "content"}
_JSON_FIELDS = ("question", "answer", "problem", "solution", "title", "summary")
_TAG = re.compile(r"<[^>]+>")


def chat_template() -> str:
    """Qwen2.5's chat template (from the vendored tokenizer_config.json)."""
    return json.loads((QWEN_TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]


def corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Text fields of RSS/Atom feeds and GSM8K/MATH jsonl files (folders: sorted contents),
    followed by the prompt-template strings."""
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                yield from _jsonl_texts(f)
            elif f.suffix in {".xml", ".rss", ".atom"}:
                yield from _feed_texts(f)
    for _ in range(TEMPLATE_REPEATS):
        yield from TEMPLATE_STRINGS


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                yield from (rec[k] for k in _JSON_FIELDS if isinstance(rec.get(k), str))


def _feed_texts(path: Path) -> Iterator[str]:
    for el in ET.parse(path).getroot().iter():
        if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] in _TEXT_TAGS and el.text:
            text = " ".join(html.unescape(_TAG.sub(" ", el.text)).split())
            if text:
                yield text


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a deterministic byte-level BPE (Qwen2 pre-tokenizer) on ``texts``; return it as a
    ``PreTrainedTokenizerFast`` with Qwen2.5's chat template, saved to ``out_dir`` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=chat_template(),
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def load_qwen_tokenizer(src: str | Path = QWEN_TOKENIZER_DIR, out_dir: str | Path | None = None):
    """The real Qwen2.5 tokenizer (151,665 tokens) from the vendored files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    if len(tok) != 151665:
        raise ValueError(f"{src}: expected the Qwen2.5 tokenizer with 151665 tokens, got {len(tok)}")
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> None:
    """Save with the chat template inside tokenizer_config.json and class names that
    transformers 4.x and 5.x (and so mlx-lm) both resolve."""
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def make_tokenizer(build, corpus_files: Iterable[str | Path] = (), out_dir: str | Path | None = None):
    """The tokenizer a ``ModelBuild`` block asks for (``bpe`` or ``qwen``)."""
    if build.tokenizer == "qwen":
        return load_qwen_tokenizer(out_dir=out_dir)
    corpus_files = list(corpus_files)
    if not corpus_files:
        from rlmeta.errors import UserError

        raise UserError("a bpe tokenizer needs corpus files (RSS feeds, GSM8K/MATH jsonl): pass --corpus")
    return train_bpe_tokenizer(corpus_texts(corpus_files), build.vocab_size, out_dir)
