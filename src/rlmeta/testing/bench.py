"""Shared helpers of ``benchmarks/*.py``: the machine's own peak ("against the limit") and model FLOPs.

``gemm_peak_gflops(backend)`` times a large float32 matrix product in the backend a benchmark path
uses (torch or mlx) and returns the best GFLOP/s over a few repeats: the machine's practical peak
for that backend, against which a path's model FLOP/s is read as a fraction.

Model FLOPs of a decoder-only transformer (Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", section 2.1 / table 1; PaLM, Chowdhery et al. 2022, appendix B): per token, a forward pass
costs ``2 * N + 2 * n_layers * n_ctx * d_attn`` FLOPs, where ``N`` counts the parameters of the
matrix products (every layer's attention and MLP projections and the unembedding; the input
embedding is a lookup) and the second term is the attention scores and weighted sum over ``n_ctx``
earlier positions. The backward pass costs twice the forward, so a trained token costs
``3 x`` the forward: ``6 * N + 6 * n_layers * n_ctx * d_attn``. These are the "model FLOPs" of
PaLM's MFU: recomputation and padding are not counted, so a path that wastes work scores lower
(in an RL step a group's shared prompt counts once, for generation and for training).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["gemm_peak_gflops", "model_shape", "matmul_params", "flops_per_token", "tokens_flops", "gflops",
           "rl_generation_flops", "rl_train_flops", "rl_step_flops"]


def gemm_peak_gflops(backend: str = "torch", n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` float32 matrix product over ``repeats`` timed runs (one warm-up).

    ``backend``: ``"torch"`` (its current intra-op thread count), ``"mlx"`` (default device;
    ``mx.eval`` forces the lazy product) or ``"numpy"`` (its BLAS, which the MLX CPU
    fast path uses). A product costs ``2 * n**3`` FLOPs.
    """
    if backend == "torch":
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)

        def once():
            torch.mm(a, b)
    elif backend == "numpy":  # the BLAS the MLX CPU fast path (rlmeta.policy.mlx_packed) hands its products to
        import numpy as np

        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)

        def once():
            a @ b
    elif backend == "mlx":
        import mlx.core as mx

        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b)

        def once():
            mx.eval(a @ b)
    else:
        raise ValueError(f"backend must be 'torch', 'mlx' or 'numpy', not {backend!r}")
    once()  # warm-up: allocation, kernel selection
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def model_shape(config: dict | str | Path) -> dict:
    """The sizes FLOP counting needs, from an HF ``config.json`` (a dict, the file, or its folder)."""
    if not isinstance(config, dict):
        p = Path(config)
        config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    return {"vocab": config["vocab_size"], "d_model": d, "n_layers": config["num_hidden_layers"],
            "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads, "head_dim": head_dim,
            "d_ff": config["intermediate_size"]}


def matmul_params(config: dict | str | Path) -> int:
    """``N``: weights of the matrix products per token (attention q/k/v/o, SwiGLU gate/up/down per layer,
    and the unembedding, counted once even when tied to the input embedding; norms and biases left out)."""
    s = model_shape(config)
    d, hd = s["d_model"], s["head_dim"]
    attn = d * s["heads"] * hd + 2 * d * s["kv_heads"] * hd + s["heads"] * hd * d
    mlp = 3 * d * s["d_ff"]
    return s["n_layers"] * (attn + mlp) + d * s["vocab"]


def flops_per_token(config: dict | str | Path, ctx: float, train: bool = False) -> float:
    """Model FLOPs of one token seeing ``ctx`` earlier positions: ``2N + 2 L ctx d_attn`` forward,
    three times that when ``train`` (forward + backward). Kaplan et al. 2020 table 1; PaLM appendix B."""
    s = model_shape(config)
    fwd = 2 * matmul_params(config) + 2 * s["n_layers"] * ctx * s["heads"] * s["head_dim"]
    return 3 * fwd if train else fwd


def tokens_flops(config: dict | str | Path, prompt_len: float, new_tokens: float, train: bool = False) -> float:
    """Model FLOPs of one sequence: ``prompt_len`` prompt tokens then ``new_tokens`` more, each attending to
    every earlier position (the mean context of a run of tokens from ``a`` to ``b`` is ``(a + b) / 2``)."""
    total = 0.0
    if prompt_len:
        total += prompt_len * flops_per_token(config, prompt_len / 2, train)
    if new_tokens:
        total += new_tokens * flops_per_token(config, prompt_len + new_tokens / 2, train)
    return total


def gflops(flops: float, seconds: float) -> float:
    """GFLOP/s, 0 when nothing was timed."""
    return flops / seconds / 1e9 if seconds > 0 else 0.0



def _group_flops(config, prompt_len: float, group_size: int, new_tokens: float, train: bool) -> float:
    """One prompt run once, then ``group_size`` continuations of ``new_tokens`` each."""
    once = tokens_flops(config, prompt_len, 0, train)
    return once + group_size * (tokens_flops(config, prompt_len, new_tokens, train) - once)


def rl_generation_flops(config: dict | str | Path, prompt_lens: list[float], group_size: int,
                        new_tokens: float) -> float:
    """Sampling ``group_size`` completions of ``new_tokens`` per prompt: one prefill per prompt, forward only."""
    return sum(_group_flops(config, p, group_size, new_tokens, False) for p in prompt_lens)


def rl_train_flops(config: dict | str | Path, prompt_lens: list[float], group_size: int, new_tokens: float) -> float:
    """One forward + backward over every prompt's group: the prompt counted once per group (the work a
    trainer needs; one that repeats the prompt per completion does more than it is credited with)."""
    return sum(_group_flops(config, p, group_size, new_tokens, True) for p in prompt_lens)


def rl_step_flops(config: dict | str | Path, prompt_lens: list[float], group_size: int, new_tokens: float,
                  forwards: float = 0.0) -> float:
    """Model FLOPs of one RL step: ``rl_generation_flops`` + ``rl_train_flops`` + ``forwards`` extra forward
    passes over the same tokens (old-policy / reference log-probs)."""
    train = rl_train_flops(config, prompt_lens, group_size, new_tokens)
    return rl_generation_flops(config, prompt_lens, group_size, new_tokens) + train * (1 + forwards / 3)
