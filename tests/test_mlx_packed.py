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
