"""The packed CPU path of ``sequence_logprobs`` for Qwen2/Qwen3 models (MLX on Linux).

The Linux ``mlx[cpu]`` wheel multiplies matrices with the reference BLAS (~2 GFLOP/s, 20-40x
slower than NumPy's OpenBLAS), and a padded GRPO batch repeats each prompt once per completion
and computes full (L, L) attention for every row. The packed path instead
  * shares prompts: rows with the same prompt run it once (a GRPO group is one prompt);
  * packs tokens: no padding, prompt positions once, completion positions once per row;
  * runs the matrix products (linear layers, causal attention, LM head with its log-softmax)
    in NumPy through ``mx.custom_function``s with hand-written VJPs; embeddings, norms, RoPE
    and activations stay MLX ops, so ``nn.value_and_grad`` differentiates the whole thing.
Being eager (NumPy evaluates its inputs), it cannot run under ``mx.compile``. On the headlines
batch (32 rows: 8 prompts of ~300-450 tokens, completions of ~150) one forward + backward
takes ~0.5 s instead of ~14 s; log-probs and gradients agree to float32 rounding (~1e-6).

Sampling has a host path of its own for the same models (``host_forward``, ``host_logits``, ``host_draw``, used by
``MLXPolicy._sample``): mlx-lm's KV-cached forward step by step with the products, attention and SwiGLU in NumPy,
and unshaped draws in NumPy from MLX's own uniforms (MLX's CPU ``exp`` is as slow as its matmul). 64 prompts x 4
samples of the default tiny model: 2.6k -> 11.7k tokens/s (docs/benchmarks.md).
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from rlmeta.policy.mlx_compat import TransformersRoPE

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


def _np_linear(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """``module(x)`` of a plain or LoRA linear (``mlx_lm.tuner.lora``; no dropout: inference) in NumPy."""
    if type(module) is nn.Linear:
        y = x @ _host(module.weight).T
        return y + _host(module.bias) if "bias" in module else y
    if type(module).__name__ == "LoRALinear" and type(module.linear) is nn.Linear:
        z = (x @ _host(module.lora_a)) @ _host(module.lora_b)
        return _np_linear(module.linear, x) + np.float32(module.scale) * z
    return _host(module(mx.array(x)))


def _host_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray) -> np.ndarray:
    """``mx.fast.scaled_dot_product_attention`` of ``q (B, H, L, D)`` over ``k, v (B, Hkv, K, D)`` (grouped
    queries: head ``h`` reads kv head ``h // (H / Hkv)``) with a boolean ``mask (B, 1, L, K)``, in NumPy. A
    masked score is the float32 minimum, not -inf, so that a query with no key at all (a left-padding
    position) gets finite weights and no NaN reaches the cache."""
    b, h, length, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    rep = h // hkv
    s = np.matmul(q.reshape(b, hkv, rep * length, d) * np.float32(scale), k.transpose(0, 1, 3, 2))
    s = np.where(mask[:, :, None], s.reshape(b, hkv, rep, length, keys), np.finfo(np.float32).min)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s.reshape(b, hkv, rep * length, keys), v).reshape(b, h, length, d)


def host_forward(model: nn.Module, inputs: mx.array, cache: list) -> np.ndarray:
    """The decoder's final hidden states ``(B, L, d)`` of ``inputs (B, L)`` after ``cache`` (mlx-lm KV caches,
    updated as the model's own forward does), for sampling on the CPU device (``_packable`` models). The same
    steps as mlx-lm's Qwen2/Qwen3 forward, with its norms, RoPE and cache in MLX, and its matrix products,
    attention and SwiGLU in NumPy: MLX's reference BLAS and its CPU ``exp`` are 20-50x slower than NumPy's
    on Linux (a 256-row decode step of the default tiny model: ~75 ms -> ~15 ms with the head and the draw,
    docs/benchmarks.md). Inference only (no VJP): training takes ``packed_logprobs``. tests/test_mlx_packed.py
    holds it to mlx-lm's own forward."""
    core = model.model
    h = core.embed_tokens(inputs)
    b, length = inputs.shape
    mask = np.asarray(cache[0].make_mask(length, return_array=True))
    mask = np.broadcast_to(mask, (b, 1, length, mask.shape[-1]))
    h = _host(h)
    with _blas_threads():
        for layer, c in zip(core.layers, cache):
            attn, mlp = layer.self_attn, layer.mlp
            x = _host(layer.input_layernorm(mx.array(h)))
            q = mx.array(_np_linear(attn.q_proj, x).reshape(b, length, attn.n_heads, -1))
            k = mx.array(_np_linear(attn.k_proj, x).reshape(b, length, attn.n_kv_heads, -1))
            v = mx.array(_np_linear(attn.v_proj, x).reshape(b, length, attn.n_kv_heads, -1))
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            q, k = attn.rope(q, offset=c.offset), attn.rope(k, offset=c.offset)
            keys, values = c.update_and_fetch(k, v)
            o = _host_sdpa(_host(q), _host(keys), _host(values), float(attn.scale), mask)
            h = h + _np_linear(attn.o_proj, o.transpose(0, 2, 1, 3).reshape(b, length, -1))
            x = _host(layer.post_attention_layernorm(mx.array(h)))
            gate, up = _np_linear(mlp.gate_proj, x), _np_linear(mlp.up_proj, x)
            h = h + _np_linear(mlp.down_proj, gate / (1.0 + np.exp(-gate)) * up)  # swiglu: silu(gate) * up
    return _host(core.norm(mx.array(h)))


def host_logits(model: nn.Module, hidden: np.ndarray) -> np.ndarray:
    """Output logits ``(N, V)`` of final hidden states ``(N, d)`` (tied or separate head), in NumPy."""
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.model.embed_tokens.weight
    hn, wn = _host(hidden), _host(head)
    with _blas_threads():
        return hn @ wn.T


def host_draw(logits: np.ndarray, inv_temperature: float, u: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``rlmeta.policy.mlx_policy.sample`` without shaping, in NumPy: the token of each row of ``logits (B, V)``
    at the uniform ``u (B, 1)`` of the inverse CDF (``None``: greedy), and its log-prob under
    ``log_softmax(logits * inv_temperature)``. MLX's CPU ``exp`` is ~24x slower than NumPy's (a (256, 2048)
    batch: 7.1 vs 0.29 ms), and sampling runs it on every row at every step."""
    scaled = logits * np.float32(inv_temperature) if inv_temperature != 1.0 else logits
    top = scaled.max(axis=-1, keepdims=True)
    e = np.exp(scaled - top)
    lp = scaled - top - np.log(e.sum(axis=-1, keepdims=True))
    if u is None:
        nxt = lp.argmax(axis=-1)
    else:
        cdf = np.cumsum(e, axis=-1)
        nxt = np.minimum((cdf <= u * cdf[:, -1:]).sum(axis=-1), logits.shape[-1] - 1)
    return nxt, lp[np.arange(len(nxt)), nxt]


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
    def of(cls, model, input_ids, prompt_lengths, completion_mask) -> PackedPlan | None:
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
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
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


def host_token_logprobs(targets: np.ndarray, inv_temperature: float, entropy: bool = False):
    """``log_softmax(h @ w.T * inv_temperature)[i, targets[i]]`` for ``h (N, d)``, ``w (V, d)``, in
    NumPy, ``HEAD_CHUNK`` logits at a time; the VJP recomputes the logits.

    ``entropy``: the function returns ``(logprobs, entropies)``, the second the entropy (nats) of each
    row's distribution, ``lse - sum(p * z)``, taken from the same logits (no gradient flows through it)."""
    scale = np.float32(inv_temperature)

    def chunks(n, vocab):
        step = max(1, HEAD_CHUNK // max(1, vocab))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def logits(hn, wn, sl, with_exp=False):
        z = hn[sl] @ wn.T
        if inv_temperature != 1:
            z *= scale
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - m)
        s = e.sum(axis=-1, keepdims=True)
        lse = m + np.log(s)
        return (z, lse, e, s) if with_exp else (z, lse)

    def forward(h, w):
        hn, wn = _host(h), _host(w)
        out = np.empty(hn.shape[0], np.float32)
        ent = np.empty(hn.shape[0], np.float32) if entropy else None
        with _blas_threads():
            for sl in chunks(hn.shape[0], wn.shape[0]):
                z, lse, e, s = logits(hn, wn, sl, with_exp=True)
                out[sl] = z[np.arange(z.shape[0]), targets[sl]] - lse[:, 0]
                if entropy:
                    ent[sl] = lse[:, 0] - (e * z).sum(axis=-1) / s[:, 0]
        return out, ent

    def backward(primals, g):
        hn, wn = (_host(a) for a in primals)
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

    if entropy:
        @mx.custom_function
        def token_logprobs_and_entropy(h, w):
            out, ent = forward(h, w)
            return mx.array(out), mx.array(ent)

        @token_logprobs_and_entropy.vjp
        def token_logprobs_and_entropy_vjp(primals, cotangents, outputs):
            return backward(primals, _host(cotangents[0]))  # the entropy is a metric: no gradient

        return token_logprobs_and_entropy

    @mx.custom_function
    def token_logprobs(h, w):
        return mx.array(forward(h, w)[0])

    @token_logprobs.vjp
    def token_logprobs_vjp(primals, cotangent, output):
        return backward(primals, _host(cotangent))

    return token_logprobs


def packed_logprobs(model: nn.Module, plan: PackedPlan, completion_mask: mx.array,
                    temperature: float = 1.0, entropy: bool = False):
    """``sequence_logprobs`` over ``plan``'s packed tokens (see the notes above ``HOST_GEMM``); with ``entropy``,
    ``(logprobs, entropies)``, both ``(B, T)`` and zero past each completion."""
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
    gather = mx.array(plan.gather)
    pad = mx.zeros((1,), mx.float32)
    if entropy:
        lp, ent = host_token_logprobs(plan.targets, inv_t, entropy=True)(h, head)
        ent = mx.stop_gradient(mx.concatenate([ent, pad])[gather] * completion_mask)
        return mx.concatenate([lp, pad])[gather] * completion_mask, ent
    lp = host_token_logprobs(plan.targets, inv_t)(h, head)
    return mx.concatenate([lp, pad])[gather] * completion_mask
