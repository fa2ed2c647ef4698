"""The CPU fast path of MLX sequence_logprobs (shared prompts, packed tokens, NumPy GEMMs)
gives the same log-probs and gradients as MLX's own padded computation."""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
from mlx.utils import tree_flatten  # noqa: E402

from rlmeta.policy import load_policy, mlx_packed  # noqa: E402
from rlmeta.policy import mlx_policy as mp  # noqa: E402
from rlmeta.policy.lora import apply_lora  # noqa: E402
from rlmeta.settings import LoraSettings  # noqa: E402
from rlmeta.testing.models import cached_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(pytestconfig):
    return cached_checkpoint(pytestconfig, "tiny")


def _batch(pad_id):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 300, size=n).tolist() for n in (30, 1, 45, 12)]
    completions = [rng.integers(5, 300, size=n).tolist() for n in (20, 7, 0, 15, 1, 9, 25, 3)]
    rows = [prompts[i] for i in (0, 0, 1, 1, 2, 3, 3, 0)]  # groups share prompts; one empty completion
    return mp.pad_batch(rows, completions, pad_id)


def _both_paths(model, batch, temperature, monkeypatch):
    adv = mx.array(np.random.default_rng(1).normal(size=(batch[0].shape[0],)).astype(np.float32))

    def loss(m):
        return -(mp.sequence_logprobs(m, *batch, temperature).sum(-1) * adv).sum()

    out = {}
    for flag in (False, True):
        monkeypatch.setattr(mlx_packed, "HOST_GEMM", flag)
        used = mlx_packed.PackedPlan.of(model, *batch) is not None if flag else False
        lp = np.array(mp.sequence_logprobs(model, *batch, temperature))
        _, grads = nn.value_and_grad(model, loss)(model)
        out[flag] = (lp, {k: np.array(g) for k, g in tree_flatten(grads)}, used)
    return out[False], out[True]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_path_matches_padded(ckpt, temperature, monkeypatch):
    policy = load_policy(ckpt, "mlx")
    padded, packed = _both_paths(policy.model, _batch(policy.pad_id), temperature, monkeypatch)
    assert packed[2], "the packed CPU path was not taken"
    assert np.abs(padded[0] - packed[0]).max() < 5e-5
    assert ((padded[0] == 0) == (packed[0] == 0)).all()  # masked positions stay exactly zero
    for name, g in padded[1].items():
        scale = np.abs(g).max() + 1e-12
        assert np.abs(g - packed[1][name]).max() / scale < 1e-4, name


def test_packed_path_with_lora(ckpt, monkeypatch):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    policy = apply_lora(load_policy(ckpt, "mlx"), lora, seed=0)
    for _, module in policy.model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(0)) * 0.05
    padded, packed = _both_paths(policy.model, _batch(policy.pad_id), 0.9, monkeypatch)
    assert np.abs(padded[0] - packed[0]).max() < 5e-5
    for name, g in padded[1].items():
        assert np.abs(g - packed[1][name]).max() / (np.abs(g).max() + 1e-12) < 1e-4, name


# --------------------------------------------------------------------------- sampling's host path

def _qwen2_model():
    """A random mlx-lm Qwen2 (biases on q/k/v, no q/k norms): the other architecture ``_packable`` accepts."""
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=300,
                           rope_theta=10000.0, tie_word_embeddings=True)
    mx.random.seed(0)
    model = qwen2.Model(args)  # mlx's random initialisation (biases too)
    mx.eval(model.parameters())
    return mp.use_transformers_rope(model)


def _models(ckpt):
    policy = load_policy(ckpt, "mlx")
    lora = apply_lora(load_policy(ckpt, "mlx"), LoraSettings(r=4, alpha=8, dropout=0.0,
                                                             target_modules=["q_proj", "o_proj", "up_proj"]), seed=0)
    for _, module in lora.model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(0)) * 0.05
    lora.model.eval()
    return {"qwen3": policy.model, "qwen3+lora": lora.model, "qwen2": _qwen2_model()}


def test_host_forward_matches_mlx_lm_through_prefill_and_decode(ckpt):
    """``host_forward`` (sampling's CPU path: NumPy products and attention) gives mlx-lm's own forward's hidden
    states and logits and fills the KV cache with the same keys and values: a left-padded prefill of prompts of
    different lengths, then decode steps, on Qwen3, Qwen3 with LoRA adapters and Qwen2 (biases, no q/k norms)."""
    from mlx_lm.models.cache import BatchKVCache

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 290, size=n).tolist() for n in (9, 3, 14)]
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    x = mx.array([[0] * m + p for p, m in zip(prompts, pads)], dtype=mx.int32)
    for name, model in _models(ckpt).items():
        assert mlx_packed._packable(model), name
        ours, theirs = ([BatchKVCache(pads) for _ in model.layers] for _ in range(2))
        step = x
        for t in range(4):
            h_ours = mlx_packed.host_forward(model, step, ours)
            h_theirs = np.array(model.model(step, cache=theirs))
            real = np.arange(step.shape[1])[None, :] >= (np.array(pads)[:, None] if t == 0 else np.zeros((3, 1)))
            assert np.abs(h_ours - h_theirs)[real].max() < 1e-4, (name, t)
            for a, b in zip(ours, theirs):
                ka, kb = np.array(a.keys[..., :a._idx, :]), np.array(b.keys[..., :b._idx, :])
                va, vb = np.array(a.values[..., :a._idx, :]), np.array(b.values[..., :b._idx, :])
                cached = np.arange(a._idx)[None, :] >= np.array(pads)[:, None]  # (B, K): not padding
                assert ka.shape == kb.shape and np.abs(ka - kb).transpose(0, 2, 1, 3)[cached].max() < 1e-4
                assert np.abs(va - vb).transpose(0, 2, 1, 3)[cached].max() < 1e-4, (name, t)
                assert np.isfinite(ka).all() and np.isfinite(va).all()  # padding queries: no NaN in the cache
            logits = mlx_packed.host_logits(model, h_ours[:, -1])
            assert np.abs(logits - np.array(mp.lm_head(model, mx.array(h_theirs[:, -1])))).max() < 1e-3, name
            step = mx.array(logits.argmax(-1)[:, None].astype(np.int32))


def test_host_draw_is_samples_inverse_cdf_draw():
    """``host_draw`` picks the token ``mlx_policy.sample`` picks from the same uniform (it draws the same
    ``mx.random.uniform`` per row) and returns its log-prob under the tempered softmax; greedy is the argmax."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(256, 300)) * 3).astype(np.float32)
    for temperature in (1.0, 0.7):
        inv_t = 1.0 / temperature
        lp = mx.array(logits * np.float32(inv_t))
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        mx.random.seed(5)
        theirs = np.array(mp.sample(lp))
        mx.random.seed(5)
        u = np.asarray(mx.random.uniform(shape=(256, 1)))
        ours, chosen = mlx_packed.host_draw(logits, inv_t, u)
        assert (ours == theirs).mean() >= 0.99, temperature  # float32 rounding of two CDFs may move a boundary
        assert np.abs(chosen - np.array(lp)[np.arange(256), ours]).max() < 1e-5
    greedy, chosen = mlx_packed.host_draw(logits, 1.0, None)
    assert (greedy == logits.argmax(-1)).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_on_the_host_path_matches_mlx(ckpt, temperature, monkeypatch):
    """``MLXPolicy.generate`` with the host path and with MLX alone: greedy completions are equal token for
    token (stops included) with log-probs within 1e-5; sampled ones from the same seed are equal but for the
    rare draw that float32 rounding moves across a CDF boundary (every later token then differs)."""
    policy = load_policy(ckpt, "mlx")
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {2 * i}?"}] for i in range(12)]
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(mlx_packed, "HOST_GEMM", flag)
        out[flag] = policy.generate(prompts, 4, temperature=temperature, max_new_tokens=24, seed=3)
    same = [list(a.token_ids) == list(b.token_ids) for a, b in zip(out[True], out[False])]
    assert np.mean(same) >= (1.0 if temperature == 0 else 0.9), np.mean(same)
    for a, b, s in zip(out[True], out[False], same):
        if s:
            assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-5
            assert a.finish_reason == b.finish_reason
