"""Build a tiny randomly initialised Qwen3 checkpoint that transformers and mlx-lm both load.

The folder holds config.json (Qwen3ForCausalLM, float32, tied embeddings),
model.safetensors, generation_config.json and the tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rlmeta.io import atomic_dir
from rlmeta.models.tokenizer import EOS_TOKEN, PAD_TOKEN, make_tokenizer, save_tokenizer
from rlmeta.settings import ModelBuild

log = logging.getLogger(__name__)

ROPE_THETA = 10000.0


def qwen3_config(build: ModelBuild, tokenizer):
    """The ``Qwen3Config`` for a build block and its tokenizer (vocab padded to a multiple of 64).

    ``pad_token_id`` is left out of the model config (as in the released Qwen3 configs) so the
    pad embedding is an ordinary trainable row on both backends; the tokenizer and
    generation_config.json carry the pad id.
    """
    from transformers import Qwen3Config

    b = build
    return Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads,
        num_key_value_heads=b.num_kv_heads,
        head_dim=b.hidden_size // b.num_heads,
        max_position_embeddings=b.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        dtype="float32",
    )


def build_tiny_model(out_dir: str | Path, build: ModelBuild, corpus_files: list[Path], seed: int) -> Path:
    """Train/load the tokenizer, initialise a Qwen3 model with ``torch.manual_seed(seed)`` and
    write the checkpoint atomically to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok = make_tokenizer(build, corpus_files)
        config = qwen3_config(build, tok)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        eos, pad = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
        GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad).save_pretrained(tmp)
        _add_legacy_keys(tmp / "config.json")
    n = sum(p.numel() for p in model.parameters())
    log.info("built %s: %d parameters, vocab %d, %.1fs", out_dir, n, config.vocab_size, time.perf_counter() - t0)
    return out_dir


def _add_legacy_keys(path: Path) -> None:
    """Top-level ``rope_theta`` for transformers 4.x and older mlx-lm (5.x nests it)."""
    cfg = json.loads(path.read_text())
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", ROPE_THETA))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def command(p: argparse.ArgumentParser):
    """``rlmeta build-model``: a tiny model from a ``models.<name>.build`` block."""
    from rlmeta.cli import add_settings
    from rlmeta.settings import ModelBuild

    add_settings(p, "build", ModelBuild, "the models.<name>.build block", required=True)
    p.add_argument("--corpus", nargs="*", default=[], type=Path,
                   help="RSS/Atom files, GSM8K/MATH jsonl files or folders (bpe tokenizer only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation (default 0)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (replaced atomically)")
    return lambda a: build_tiny_model(a.out, a.build, a.corpus, a.seed)
