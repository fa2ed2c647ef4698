"""MLX policy on mlx-lm.

Sampling runs every completion of a call in one batch over mlx-lm's ``BatchKVCache``
(left-padded prompts, each prefilled once, finished rows dropped as they stop). Teacher-forced
log-probs use right-padded rows (a causal model needs no mask for them) and gather the
completion positions, so ``sequence_logprobs`` is differentiable under ``nn.value_and_grad``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_top_p

from rlmeta.io import atomic_dir, write_json
from rlmeta.models.tokenizer import save_tokenizer
from rlmeta.policy.base import (Generation, Prompts, as_token_ids, checkpoint_eos, copy_extra_files, encode_prompts,
                                eval_mode, finish, pad_token_id, read_config, stop_token_ids)

LOGITS_BUDGET = 2**27
"""Float32 logits elements held at once by ``MLXPolicy.logprobs`` (512 MiB)."""


def sample(logprobs: mx.array, top_p: float = 1.0, greedy: bool = False) -> mx.array:
    """Draw one token per row from (temperature-scaled) log-probs, top-p truncated.

    Temperature comes first, then top-p, as in transformers (``mlx_lm``'s ``make_sampler``
    applies top-p to the unscaled distribution). Inverse-CDF sampling: one uniform per row,
    far cheaper on CPU than ``mx.random.categorical``'s one Gumbel draw per vocabulary entry.
    """
    if greedy:
        return mx.argmax(logprobs, axis=-1)
    if top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    cdf = mx.cumsum(mx.exp(logprobs), axis=-1)
    u = mx.random.uniform(shape=(logprobs.shape[0], 1)) * cdf[:, -1:]
    return mx.minimum((cdf <= u).sum(axis=-1), logprobs.shape[-1] - 1)


class TransformersRoPE(nn.Module):
    """``nn.RoPE`` with transformers' frequencies: ``mx.fast.rope``'s own drift from them with the
    position (5e-5 at position 512 for a unit input), which would break parity with torch.
    ``1 / base ** (2i / dims)`` is computed in float64 and rounded, as torch's float32 is."""

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000.0, scale: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.scale = dims, traditional, scale
        inv = (1.0 / base ** (np.arange(0, dims, 2) / dims)).astype(np.float32)
        self._periods = mx.array(1.0 / inv.astype(np.float64), dtype=mx.float32)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=self.scale, offset=offset,
                            freqs=self._periods)


def use_transformers_rope(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.RoPE`` of an mlx-lm model for ``TransformersRoPE`` (in place)."""
    for _, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if type(rope) is nn.RoPE:
            module.rope = TransformersRoPE(rope.dims, rope.traditional, rope.base, rope.scale)
    return model


def lm_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Output logits of a decoder's final hidden states (tied or separate head)."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def pad_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-padded ``prompt + completion`` rows for ``sequence_logprobs``.

    Returns ``(input_ids (B, L) int32, prompt_lengths (B,) int32, completion_mask (B, T) float32)``
    with ``T`` the longest completion.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    t = max(1, max(len(c) for c in completion_ids))
    input_ids = mx.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=mx.int32)
    prompt_lengths = mx.array([len(p) for p in prompt_ids], dtype=mx.int32)
    mask = mx.array([[1.0] * len(c) + [0.0] * (t - len(c)) for c in completion_ids], dtype=mx.float32)
    return input_ids, prompt_lengths, mask


def sequence_logprobs(model: nn.Module, input_ids: mx.array, prompt_lengths: mx.array,
                      completion_mask: mx.array, temperature: float = 1.0) -> mx.array:
    """Differentiable log-probs ``(B, T)`` of the completion tokens of right-padded rows.

    Row ``i``'s completion starts at column ``prompt_lengths[i]``; entry ``(i, j)`` is
    ``log_softmax(logits / temperature)`` of token ``input_ids[i, prompt_lengths[i] + j]``,
    zero where ``completion_mask`` is 0 (see ``pad_batch``).

    On a CPU device, float32 Qwen2/Qwen3 models take ``packed_logprobs`` (the same values to
    float32 rounding, ~25x faster on a GRPO batch); other models and devices run the padded batch
    through mlx-lm.
    """
    plan = PackedPlan.of(model, input_ids, prompt_lengths, completion_mask) if HOST_GEMM else None
    if plan is not None:
        return packed_logprobs(model, plan, completion_mask, temperature)
    b, width = input_ids.shape
    t = completion_mask.shape[1]
    cols = mx.minimum(prompt_lengths[:, None] + mx.arange(t)[None, :], width - 1)  # (B, T) targets
    hidden = model.model(input_ids)
    hidden = mx.take_along_axis(hidden, (cols - 1)[..., None], axis=1)  # states that predict them
    logits = lm_head(model, hidden).astype(mx.float32)
    if temperature not in (0, 1):
        logits = logits * (1.0 / temperature)
    targets = mx.take_along_axis(input_ids, cols, axis=1)
    chosen = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return (chosen - mx.logsumexp(logits, axis=-1)) * completion_mask


# -- the packed CPU path of ``sequence_logprobs`` ---------------------------------------------
#
# The Linux ``mlx[cpu]`` wheel multiplies matrices with the reference BLAS (~2 GFLOP/s, 20-40x
# slower than NumPy's OpenBLAS), and a padded GRPO batch repeats each prompt once per completion
# and computes full (L, L) attention for every row. The packed path instead
#   * shares prompts: rows with the same prompt run it once (a GRPO group is one prompt);
#   * packs tokens: no padding, prompt positions once, completion positions once per row;
#   * runs the matrix products (linear layers, causal attention, LM head with its log-softmax)
#     in NumPy through ``mx.custom_function``s with hand-written VJPs; embeddings, norms, RoPE
#     and activations stay MLX ops, so ``nn.value_and_grad`` differentiates the whole thing.
# Being eager (NumPy evaluates its inputs), it cannot run under ``mx.compile``. On the headlines
# batch (32 rows: 8 prompts of ~300-450 tokens, completions of ~150) one forward + backward
# takes ~0.5 s instead of ~14 s; log-probs and gradients agree to float32 rounding (~1e-6).

HOST_GEMM = True
"""Let ``sequence_logprobs`` take the packed NumPy-GEMM path where it applies (CPU device)."""

PACKED_MODEL_TYPES = ("qwen2", "qwen3")

HOST_GEMM_THREADS = 1
"""OpenBLAS threads for those products: its spinning workers lose badly on a shared 2-core box
(2-4x slower than one thread); ``None`` leaves NumPy's setting alone."""


def _host(a: mx.array) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


_BLAS_THREADS: list = []


def _openblas_threads():
    """(get, set) of the thread count of NumPy's OpenBLAS, or None (another BLAS, not found)."""
    if not _BLAS_THREADS:
        import ctypes
        import re

        found = None
        try:
            libs = sorted(set(re.findall(r"(/\S*openblas\S*\.so[\w.]*)", Path("/proc/self/maps").read_text())))
        except OSError:
            libs = []
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("scipy_openblas", ""),
                                   ("openblas", "")):
                get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
                if hasattr(lib, get) and hasattr(lib, put):
                    found = (getattr(lib, get), getattr(lib, put))
                    found[0].restype, found[1].argtypes = ctypes.c_int, [ctypes.c_int]
                    break
            if found:
                break
        _BLAS_THREADS.append(found)
    return _BLAS_THREADS[0]


class _blas_threads:
    """Run NumPy's OpenBLAS on ``HOST_GEMM_THREADS`` threads inside the block (when it can be set)."""

    def __enter__(self):
        self.prev, fns = None, _openblas_threads() if HOST_GEMM_THREADS else None
        if fns is not None and fns[0]() != HOST_GEMM_THREADS:
            self.prev = fns[0]()
            fns[1](HOST_GEMM_THREADS)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            _openblas_threads()[1](self.prev)


@mx.custom_function
def host_matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for ``x (N, in)``, ``w (out, in)``, with the product in NumPy."""
    xn, wn = _host(x), _host(w)
    with _blas_threads():
        return mx.array(xn @ wn.T)


@host_matmul_t.vjp
def _host_matmul_t_vjp(primals, cotangent, output):
    x, w = primals
    g, xn, wn = _host(cotangent), _host(x), _host(w)
    with _blas_threads():
        return mx.array(g @ wn), mx.array(g.T @ xn)


def _host_linear(module: nn.Module, x: mx.array) -> mx.array:
    """``module(x)`` for a 2-D ``x``, with the matrix product of plain and LoRA linears in NumPy."""
    if type(module) is nn.Linear:
        y = host_matmul_t(x, module.weight)
        return y + module.bias if "bias" in module else y
    base = getattr(module, "linear", None)
    if type(module).__name__ == "LoRALinear" and type(base) is nn.Linear:  # mlx_lm.tuner.lora
        z = (module.dropout(x) @ module.lora_a) @ module.lora_b
        return _host_linear(base, x) + (module.scale * z).astype(x.dtype)
    return module(x)


def _packable(model: nn.Module) -> bool:
    """A float32 Qwen2/Qwen3 decoder on a CPU device, with the module layout ``packed_logprobs`` runs."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    if getattr(model, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    core = getattr(model, "model", None)
    embed = getattr(core, "embed_tokens", None)
    if type(embed) is not nn.Embedding or embed.weight.dtype != mx.float32:
        return False
    if hasattr(model, "lm_head") and (type(model.lm_head) is not nn.Linear or "bias" in model.lm_head):
        return False
    for layer in core.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or type(getattr(attn, "rope", None)) not in (TransformersRoPE, nn.RoPE):
            return False
        if not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads",
                                              "scale")):
            return False
        if not all(hasattr(getattr(layer, "mlp", None), k) for k in ("gate_proj", "up_proj", "down_proj")):
            return False
    return True


class PackedPlan:
    """Token layout of a right-padded batch for ``packed_logprobs`` (host-side bookkeeping).

    Packed tokens: first each distinct prompt minus its last token (``prefix``, positions
    ``0..P-2``), then each row's ``[last prompt token, completion[:-1]]`` (positions
    ``P-1..``), whose hidden states predict the completion. A row's completion ends at its last
    nonzero mask entry. ``seqs``: ``(query start, query length, key ranges)`` per attention
    sequence (a prefix sees itself, a row its prompt's prefix then itself, both causally).
    """

    def __init__(self, tokens, positions, targets, n_prefix, seqs, gather):
        self.tokens, self.positions, self.targets = tokens, positions, targets
        self.n_prefix, self.seqs, self.gather = n_prefix, seqs, gather

    @classmethod
    def of(cls, model, input_ids, prompt_lengths, completion_mask) -> "PackedPlan | None":
        if not _packable(model):
            return None
        ids, plen = np.asarray(input_ids), np.asarray(prompt_lengths).astype(np.int64)
        mask = np.asarray(completion_mask)
        b, width = ids.shape
        t = mask.shape[1]
        nz = mask != 0
        clen = np.where(nz.any(axis=1), t - np.argmax(nz[:, ::-1], axis=1), 0)
        if (plen < 1).any() or (plen + clen > width).any():
            return None
        groups: dict[bytes, int] = {}
        row_group = [groups.setdefault(ids[i, :plen[i]].tobytes(), len(groups)) for i in range(b)]
        first = {g: i for i, g in reversed(list(enumerate(row_group)))}
        tokens, positions, seqs, prefix = [], [], [], []
        n = 0
        for g in range(len(groups)):
            i = first[g]
            m = int(plen[i]) - 1
            tokens.append(ids[i, :m])
            positions.append(np.arange(m))
            prefix.append((n, m))
            if m:
                seqs.append((n, m, [(n, m)]))
            n += m
        n_prefix, targets = n, []
        gather = np.full((b, t), -1, np.int64)
        for i in range(b):
            p, c = int(plen[i]), int(clen[i])
            if not c:
                continue
            tokens.append(ids[i, p - 1:p - 1 + c])
            positions.append(np.arange(p - 1, p - 1 + c))
            targets.append(ids[i, p:p + c])
            gather[i, :c] = np.arange(n - n_prefix, n - n_prefix + c)
            seqs.append((n, c, [r for r in (prefix[row_group[i]],) if r[1]] + [(n, c)]))
            n += c
        n_comp = n - n_prefix
        gather[gather < 0] = n_comp  # a zero appended after the packed log-probs
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return cls(cat(tokens).astype(np.int32), cat(positions).astype(np.int32), cat(targets).astype(np.int32),
                   n_prefix, seqs, gather)


def _gqa_heads(x: np.ndarray, n_kv: int) -> np.ndarray:
    """``(L, H, D)`` query-like rows to ``(Hkv, rep * L, D)``: query head ``h`` reads kv head ``h // rep``."""
    length, h, d = x.shape
    return np.ascontiguousarray(x.reshape(length, n_kv, h // n_kv, d).transpose(1, 2, 0, 3)).reshape(n_kv, -1, d)


def _from_gqa_heads(x: np.ndarray, length: int) -> np.ndarray:
    n_kv, _, d = x.shape
    return x.reshape(n_kv, -1, length, d).transpose(2, 0, 1, 3).reshape(length, -1, d)


def _keys(a: np.ndarray, ranges) -> np.ndarray:
    """Rows of the key ranges, ``(Hkv, K, D)``."""
    rows = a[ranges[0][0]:sum(ranges[0])] if len(ranges) == 1 else np.concatenate([a[s:s + m] for s, m in ranges])
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


def _causal_bias(length: int, keys: int, cache: dict) -> np.ndarray:
    """``(length, keys)``: 0 where query ``i`` (position ``keys - length + i``) sees the key, else -inf."""
    bias = cache.get((length, keys))
    if bias is None:
        bias = np.zeros((length, keys), np.float32)
        bias[np.arange(keys)[None, :] > (keys - length + np.arange(length))[:, None]] = -np.inf
        cache[(length, keys)] = bias
    return bias


def _probs(q: np.ndarray, k: np.ndarray, scale: float, length: int, biases: dict) -> np.ndarray:
    """Causal attention weights of one kv head: ``q (rep * L, D)`` (the sequence's last ``L``
    positions per repeat) against ``k (K, D)``, as ``(rep * L, K)``."""
    kl = k.shape[0]
    s = (q * np.float32(scale)) @ k.T
    s3 = s.reshape(-1, length, kl)
    s3 += _causal_bias(length, kl, biases)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def host_attention(seqs, scale: float, biases: dict | None = None):
    """Causal attention over packed ``q (N, H, D)``, ``k, v (N, Hkv, D)`` -> ``(N, H, D)``, in NumPy.

    Each of ``seqs`` (``PackedPlan.seqs``) attends to its key ranges; the VJP recomputes the weights.
    """
    biases = {} if biases is None else biases  # causal masks by (query, key) length

    @mx.custom_function
    def attend(q, k, v):
        qn, kn, vn = _host(q), _host(k), _host(v)
        with _blas_threads():
            return mx.array(forward(qn, kn, vn))

    def forward(qn, kn, vn):
        out = np.zeros(qn.shape, np.float32)
        n_kv = kn.shape[1]
        for start, length, ranges in seqs:
            qs, ks, vs = _gqa_heads(qn[start:start + length], n_kv), _keys(kn, ranges), _keys(vn, ranges)
            o = np.stack([_probs(qs[j], ks[j], scale, length, biases) @ vs[j] for j in range(n_kv)])
            out[start:start + length] = _from_gqa_heads(o, length)
        return out

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        qn, kn, vn = (_host(a) for a in primals)
        with _blas_threads():
            return tuple(mx.array(a) for a in backward(qn, kn, vn, _host(cotangent), _host(output)))

    def backward(qn, kn, vn, do, on):
        dq, dk, dv = np.zeros(qn.shape, np.float32), np.zeros(kn.shape, np.float32), np.zeros(vn.shape, np.float32)
        n_kv = kn.shape[1]
        sc = np.float32(scale)
        for start, length, ranges in seqs:
            sl = slice(start, start + length)
            qs, ks, vs = _gqa_heads(qn[sl], n_kv), _keys(kn, ranges), _keys(vn, ranges)
            dos, os_ = _gqa_heads(do[sl], n_kv), _gqa_heads(on[sl], n_kv)
            dqs, dks, dvs = np.empty_like(qs), np.empty_like(ks), np.empty_like(vs)
            for j in range(n_kv):
                p = _probs(qs[j], ks[j], scale, length, biases)
                dvs[j] = p.T @ dos[j]
                ds = dos[j] @ vs[j].T
                ds -= (dos[j] * os_[j]).sum(axis=-1, keepdims=True)
                ds *= p
                dqs[j] = (ds @ ks[j]) * sc
                dks[j] = (ds.T @ qs[j]) * sc
            dq[sl] = _from_gqa_heads(dqs, length)
            at = 0
            for s, m in ranges:
                dk[s:s + m] += dks[:, at:at + m].transpose(1, 0, 2)
                dv[s:s + m] += dvs[:, at:at + m].transpose(1, 0, 2)
                at += m
        return dq, dk, dv

    return attend


HEAD_CHUNK = 1 << 23
"""Logits elements held at once by ``host_token_logprobs`` (32 MiB of float32)."""


def host_token_logprobs(targets: np.ndarray, inv_temperature: float):
    """``log_softmax(h @ w.T * inv_temperature)[i, targets[i]]`` for ``h (N, d)``, ``w (V, d)``, in
    NumPy, ``HEAD_CHUNK`` logits at a time; the VJP recomputes the logits."""
    scale = np.float32(inv_temperature)

    def chunks(n, vocab):
        step = max(1, HEAD_CHUNK // max(1, vocab))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def logits(hn, wn, sl):
        z = hn[sl] @ wn.T
        if inv_temperature != 1:
            z *= scale
        m = z.max(axis=-1, keepdims=True)
        return z, m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))

    @mx.custom_function
    def token_logprobs(h, w):
        hn, wn = _host(h), _host(w)
        out = np.empty(hn.shape[0], np.float32)
        with _blas_threads():
            for sl in chunks(hn.shape[0], wn.shape[0]):
                z, lse = logits(hn, wn, sl)
                out[sl] = z[np.arange(z.shape[0]), targets[sl]] - lse[:, 0]
        return mx.array(out)

    @token_logprobs.vjp
    def token_logprobs_vjp(primals, cotangent, output):
        hn, wn = (_host(a) for a in primals)
        g = _host(cotangent)
        dh, dw = np.empty_like(hn), np.zeros_like(wn)
        with _blas_threads():
            for sl in chunks(hn.shape[0], wn.shape[0]):
                z, lse = logits(hn, wn, sl)
                z -= lse
                np.exp(z, out=z)  # softmax
                z *= -g[sl, None]
                z[np.arange(z.shape[0]), targets[sl]] += g[sl]
                if inv_temperature != 1:
                    z *= scale
                dh[sl] = z @ wn
                dw += z.T @ hn[sl]
        return mx.array(dh), mx.array(dw)

    return token_logprobs


def packed_logprobs(model: nn.Module, plan: PackedPlan, completion_mask: mx.array,
                    temperature: float = 1.0) -> mx.array:
    """``sequence_logprobs`` over ``plan``'s packed tokens (see the notes above ``HOST_GEMM``)."""
    core = model.model
    n = len(plan.tokens)
    positions = mx.array(plan.positions)
    h = core.embed_tokens(mx.array(plan.tokens))
    biases: dict = {}
    for layer in core.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _host_linear(attn.q_proj, x).reshape(n, attn.n_heads, -1)
        k = _host_linear(attn.k_proj, x).reshape(n, attn.n_kv_heads, -1)
        v = _host_linear(attn.v_proj, x).reshape(n, attn.n_kv_heads, -1)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = attn.rope(q[:, :, None], offset=positions)[:, :, 0]  # one position per packed token
        k = attn.rope(k[:, :, None], offset=positions)[:, :, 0]
        o = host_attention(plan.seqs, float(attn.scale), biases)(q, k, v)
        h = h + _host_linear(attn.o_proj, o.reshape(n, -1))
        x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        h = h + _host_linear(mlp.down_proj, swiglu(_host_linear(mlp.gate_proj, x), _host_linear(mlp.up_proj, x)))
    h = core.norm(h[plan.n_prefix:])
    head = model.lm_head.weight if hasattr(model, "lm_head") else core.embed_tokens.weight
    inv_t = 1.0 / temperature if temperature not in (0, 1) else 1.0
    lp = host_token_logprobs(plan.targets, inv_t)(h, head)
    lp = mx.concatenate([lp, mx.zeros((1,), mx.float32)])
    return lp[mx.array(plan.gather)] * completion_mask


class MLXPolicy:
    """A causal LM and its tokenizer on MLX (see ``rlmeta.policy.base.Policy``)."""

    backend = "mlx"
    lora: dict | None = None  # the lora block once adapters are attached

    def __init__(self, model: nn.Module, tokenizer, config: dict, source: str | Path | None = None):
        self.model = use_transformers_rope(model)
        self.wrapper = tokenizer  # mlx_lm TokenizerWrapper
        self.tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        self.config = dict(config)
        self.source = source
        eos = checkpoint_eos(source) if source is not None and Path(source).is_dir() else None
        self.stop_ids = stop_token_ids(self.tokenizer, eos or self.config.get("eos_token_id"))
        self.pad_id = pad_token_id(self.tokenizer)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32") -> "MLXPolicy":
        """Open a checkpoint folder (or hub id) with ``mlx_lm.load`` and cast it to ``dtype``."""
        import mlx_lm

        model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
        if Path(path).is_dir():
            config = read_config(path)
        model.set_dtype(getattr(mx, dtype))
        model.eval()
        return cls(model, tokenizer, config, source=path)

    def encode_prompts(self, messages_batch) -> list[list[int]]:
        return encode_prompts(self.tokenizer, messages_batch)

    def generate(self, prompts: Prompts, n: int = 1, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0) -> list[Generation]:
        """``n`` completions per prompt in one batch; deterministic for a seed.

        Each prompt is prefilled once (left-padded, ``BatchKVCache``) and its cache repeated
        ``n`` times; rows leave the batch when they emit a stop token.
        """
        ids = as_token_ids(self.tokenizer, prompts)
        if not ids or n < 1:
            return []
        with eval_mode(self.model):
            tokens, logps = self._sample(ids, n, temperature, top_p, max_new_tokens, seed)
        return [finish(self.tokenizer, k // n, k % n, ids[k // n], tokens[k], logps[k], self.stop_ids)
                for k in range(len(tokens))]

    def _sample(self, ids, n, temperature, top_p, max_new_tokens, seed):
        mx.random.seed(seed)
        inv_t = 1.0 / temperature if temperature > 0 else 1.0
        order, cache, logits = self._prefill(ids)
        if n > 1:
            logits = mx.repeat(logits, n, axis=0)
            for c in cache:
                c.keys, c.values = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0)
                c.offset, c.left_padding = mx.repeat(c.offset, n, axis=0), mx.repeat(c.left_padding, n, axis=0)
        rows = [order[j // n] * n + j % n for j in range(len(ids) * n)]  # batch row -> output row
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        stops = set(self.stop_ids)
        for step in range(max_new_tokens):
            scaled = logits.astype(mx.float32) * inv_t
            lp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
            nxt = sample(lp, top_p, greedy=temperature == 0)
            chosen = mx.take_along_axis(lp, nxt[:, None], axis=-1)[:, 0]
            for r, tok, v in zip(rows, nxt.tolist(), chosen.tolist()):
                tokens[r].append(tok)
                logps[r].append(v)
            keep = [i for i, r in enumerate(rows) if tokens[r][-1] not in stops]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                idx = mx.array(keep)
                for c in cache:
                    c.filter(idx)
                nxt, rows = nxt[idx], [rows[i] for i in keep]
            logits = lm_head(self.model, self.model.model(nxt[:, None], cache=cache))[:, -1]
        return tokens, logps

    def _prefill(self, ids: list[list[int]], groups: int = 4):
        """Prefill the prompts in ``groups`` length-sorted groups (less padding), one batch cache.

        Returns ``(order, cache, last_logits)``: batch row ``j`` holds prompt ``order[j]``.
        """
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        size = -(-len(ids) // groups)
        cache, logits = None, []
        for k in range(0, len(order), size):
            part = [ids[i] for i in order[k:k + size]]
            width = max(len(p) for p in part)
            pads = [width - len(p) for p in part]
            c = [BatchKVCache(pads) for _ in self.model.layers]
            x = mx.array([[self.pad_id] * m + list(p) for p, m in zip(part, pads)], dtype=mx.int32)
            logits.append(lm_head(self.model, self.model.model(x, cache=c)[:, -1:])[:, 0])
            mx.eval(logits[-1], [cc.state for cc in c])
            if cache is None:
                cache = c
            else:
                for a, b in zip(cache, c):
                    a.extend(b)
        return order, cache, mx.concatenate(logits)

    def logprobs(self, prompt_ids, completion_ids, temperature: float = 1.0) -> list[np.ndarray]:
        """Teacher-forced log-probs of each completion token, batched under ``LOGITS_BUDGET``."""
        out: list[np.ndarray] = []
        vocab = self.config.get("vocab_size", 1)
        t = max((len(c) for c in completion_ids), default=1) or 1
        chunk = max(1, LOGITS_BUDGET // (t * vocab))
        for k in range(0, len(prompt_ids), chunk):
            p, c = prompt_ids[k:k + chunk], completion_ids[k:k + chunk]
            with eval_mode(self.model):
                lp = np.array(sequence_logprobs(self.model, *pad_batch(p, c, self.pad_id), temperature))
            out += [lp[i, :len(ci)].astype(np.float32) for i, ci in enumerate(c)]
        return out

    def save(self, path: str | Path) -> Path:
        """Atomic full checkpoint (LoRA merged) that transformers and mlx_lm both open."""
        from rlmeta.policy.lora import mlx_merged_weights

        weights = mlx_merged_weights(self.model)
        dtype = next(iter(weights.values())).dtype
        config = dict(self.config, dtype=str(dtype).split(".")[-1])
        config.pop("torch_dtype", None)
        with atomic_dir(path) as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
            write_json(tmp / "config.json", config)
            save_tokenizer(self.tokenizer, tmp)
            copy_extra_files(self.source, tmp)
        return Path(path)

