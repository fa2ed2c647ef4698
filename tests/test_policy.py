"""Policies on both backends: generation shapes, stopping, seeds, log-probs, the Qwen tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

from rlmeta.policy import load_policy
from rlmeta.policy.base import Generation, Policy
from rlmeta.testing.models import cached_checkpoint, messages, questions

BACKENDS = ["mlx", "torch"]
MAX_NEW = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(pytestconfig):
    return cached_checkpoint(pytestconfig, "tiny")


@pytest.fixture(scope="module")
def policies(ckpt):
    return {b: load_policy(ckpt, b) for b in BACKENDS}


@pytest.fixture(scope="module")
def prompts():
    return messages(questions(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_shapes_and_finish_reasons(policies, prompts, backend):
    policy = policies[backend]
    assert isinstance(policy, Policy) and policy.backend == backend
    gens = policy.generate(prompts, 4, temperature=1.0, max_new_tokens=MAX_NEW, seed=0)
    assert [(g.prompt_index, g.sample_idx) for g in gens] == [(i, s) for i in range(3) for s in range(4)]
    prompt_ids = policy.encode_prompts(prompts)
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in policy.stop_ids
    for g in gens:
        assert isinstance(g, Generation)
        assert g.prompt_ids == prompt_ids[g.prompt_index]
        assert 1 <= len(g.token_ids) <= MAX_NEW and len(g.logprobs) == len(g.token_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        assert not set(g.token_ids[:-1]) & set(policy.stop_ids)  # nothing after a stop token
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in policy.stop_ids
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == MAX_NEW
        assert "<|im_end|>" not in g.text
    assert {g.finish_reason for g in gens} == {"stop", "length"}
    assert any(g.token_ids[-1] == im_end for g in gens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_determinism(policies, prompts, backend):
    policy = policies[backend]
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=MAX_NEW)
    a = policy.generate(prompts, 2, seed=7, **kw)
    b = policy.generate(prompts, 2, seed=7, **kw)
    c = policy.generate(prompts, 2, seed=8, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    ids = policy.encode_prompts(prompts)  # token-id prompts give the same samples
    assert [g.token_ids for g in policy.generate(ids, 2, seed=7, **kw)] == [g.token_ids for g in a]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_generate_logprobs_equal_teacher_forced(policies, prompts, backend, temperature, top_p):
    policy = policies[backend]
    gens = policy.generate(prompts, 3, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=1)
    tf = policy.logprobs([g.prompt_ids for g in gens], [g.token_ids for g in gens], temperature=temperature)
    for g, lp in zip(gens, tf):
        assert lp.dtype == np.float32 and lp.shape == (len(g.token_ids),)
        np.testing.assert_allclose(g.logprobs, lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ignores_seed(policies, prompts, backend):
    policy = policies[backend]
    a = policy.generate(prompts[:2], 2, temperature=0, max_new_tokens=6, seed=1)
    b = policy.generate(prompts[:2], 1, temperature=0, max_new_tokens=6, seed=2)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


def test_sequence_logprobs_differentiable(policies):
    import mlx.core as mx
    import mlx.nn as nn

    from rlmeta.policy import mlx_policy, torch_policy

    p_ids, c_ids = [[1, 5, 9, 4], [1, 7]], [[3, 8, 2], [6]]
    mp = policies["mlx"]
    batch = mlx_policy.pad_batch(p_ids, c_ids, mp.pad_id)
    assert batch[2].tolist() == [[1, 1, 1], [1, 0, 0]]

    def loss(model):
        return -mlx_policy.sequence_logprobs(model, *batch).sum()

    value, grads = nn.value_and_grad(mp.model, loss)(mp.model)
    g = grads["model"]["embed_tokens"]["weight"]
    assert np.isfinite(value.item()) and float(mx.abs(g).sum()) > 0

    tp = policies["torch"]
    tbatch = torch_policy.pad_batch(p_ids, c_ids, tp.pad_id)
    lp = torch_policy.sequence_logprobs(tp.model, *tbatch)
    assert lp.shape == (2, 3) and lp[1, 1:].abs().sum() == 0
    lp.sum().backward()
    assert tp.model.get_input_embeddings().weight.grad.abs().sum() > 0
    tp.model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(np.array(mlx_policy.sequence_logprobs(mp.model, *batch)), lp.detach().numpy(),
                               atol=1e-4)


def test_qwen_tokenizer_on_both_backends(pytestconfig):
    """A tiny model with the real Qwen2.5 tokenizer (151,665 tokens) and its chat template."""
    ckpt = cached_checkpoint(pytestconfig, "tiny-qwen", tokenizer="qwen", teach_stop=False)
    msgs = messages(questions(2))
    out = {}
    for backend in BACKENDS:
        policy = load_policy(ckpt, backend)
        assert len(policy.tokenizer) == 151665
        ids = policy.encode_prompts(msgs)
        assert ids[0][0] == policy.tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
        assert policy.tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
        assert policy.stop_ids[:2] == [151643, 151645]
        gens = policy.generate(msgs, 2, temperature=1.0, max_new_tokens=5, seed=0)
        assert len(gens) == 4 and all(len(g.token_ids) == len(g.logprobs) for g in gens)
        out[backend] = (gens, policy)
    gens, mlx = out["mlx"]
    torch_lp = out["torch"][1].logprobs([g.prompt_ids for g in gens], [g.token_ids for g in gens])
    for g, lp in zip(gens, torch_lp):
        np.testing.assert_allclose(g.logprobs, lp, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_torch_growing_cache_matches_dynamic_cache(policies, prompts, temperature, monkeypatch):
    """Sampling's cache (``growing_layer``: buffers grown CHUNK positions at a time, here 5 so that prefill and
    decoding cross several boundaries) gives exactly the tokens and log-probs of transformers' own
    ``DynamicCache``, with each prompt's cache repeated per sample and rows dropped as they stop."""
    from transformers import DynamicCache

    from rlmeta.policy import torch_policy

    policy = policies["torch"]
    monkeypatch.setattr(torch_policy.growing_layer(), "CHUNK", 5)
    ours = policy.generate(prompts, 4, temperature=temperature, max_new_tokens=24, seed=7)
    layers = torch_policy.decode_cache(policy.model.config).layers
    assert layers and all(type(layer).__name__ == "GrowingLayer" for layer in layers)
    monkeypatch.setattr(torch_policy, "decode_cache", lambda config: DynamicCache(config=config))
    theirs = policy.generate(prompts, 4, temperature=temperature, max_new_tokens=24, seed=7)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert temperature == 0 or len({len(g.token_ids) for g in ours}) > 1  # sampled rows stop at different steps
    for a, b in zip(ours, theirs):
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-6


def test_growing_layer_crop_matches_dynamic_layer():
    """``GrowingLayer.crop`` (negative: drop that many last positions) leaves what ``DynamicLayer.crop`` leaves,
    and later updates continue from there."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from rlmeta.policy.torch_policy import growing_layer

    ours, theirs = growing_layer()(), DynamicLayer()
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    for layer in (ours, theirs):
        layer.update(k, v)
        layer.crop(-3)
        layer.update(k[:, :, :2], v[:, :, :2])
    assert ours.get_seq_length() == theirs.get_seq_length() == 9
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
