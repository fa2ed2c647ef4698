"""MLX and torch agree: teacher-forced log-probs, cross-backend save/reload, LoRA merging."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rlmeta.checkpoints import MARKER, is_complete, marker
from rlmeta.cli import main
from rlmeta.policy import load_policy
from rlmeta.policy.lora import adapter_backend, apply_lora, merge_lora, save_adapter
from rlmeta.settings import LoraSettings
from rlmeta.testing.models import cached_checkpoint, messages, questions

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(pytestconfig):
    return cached_checkpoint(pytestconfig, "tiny")


@pytest.fixture(scope="module")
def policies(ckpt):
    return {b: load_policy(ckpt, b) for b in ("mlx", "torch")}


@pytest.fixture(scope="module")
def batch(policies):
    """Chat prompts of different lengths and random completions (some with <|im_end|>)."""
    pol = policies["torch"]
    rng = np.random.default_rng(0)
    msgs = [[{"role": "user", "content": "x " * k + "What is 2 + 3?"}] for k in (0, 7, 3, 15)]
    prompts = pol.encode_prompts(msgs)
    vocab = len(pol.tokenizer)
    comps = [rng.integers(3, vocab, size=n).tolist() for n in (5, 1, 9, 3)]
    comps[0][-1] = pol.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return prompts, comps


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_mlx_equal_torch(policies, batch, temperature):
    lp = {b: p.logprobs(*batch, temperature=temperature) for b, p in policies.items()}
    assert [len(x) for x in lp["mlx"]] == [len(c) for c in batch[1]]
    assert max_diff(lp["mlx"], lp["torch"]) < 1e-4


def test_logprobs_parity_on_samples_at_long_positions(policies):
    """Sampled completions after prompts repeated 4x (positions up to ~700, where mx.fast.rope's
    own frequencies would drift from transformers')."""
    gens = policies["mlx"].generate(messages(questions(4)), 2, temperature=1.0, max_new_tokens=16, seed=0)
    prompts, comps = [g.prompt_ids * 4 for g in gens], [g.token_ids for g in gens]
    assert max(len(p) for p in prompts) > 400
    lp = {b: p.logprobs(prompts, comps) for b, p in policies.items()}
    assert max_diff(lp["mlx"], lp["torch"]) < 1e-4


def test_logprobs_independent_of_batching(policies, batch):
    for p in policies.values():
        together = p.logprobs(*batch)
        alone = [p.logprobs([pi], [ci])[0] for pi, ci in zip(*batch)]
        assert max_diff(together, alone) < 1e-5


@pytest.mark.parametrize("src,dst", [("mlx", "torch"), ("torch", "mlx")])
def test_save_reloads_in_other_backend(policies, batch, tmp_path, src, dst):
    out = policies[src].save(tmp_path / "ck")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= names
    assert is_complete(out) and marker(out)["backend"] == src  # the marker lists every file, written last
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    reloaded = load_policy(out, dst)
    assert reloaded.stop_ids == policies[src].stop_ids
    after = reloaded.logprobs(*batch)
    assert max_diff(policies[dst].logprobs(*batch), after) < 1e-5  # same weights on dst
    assert max_diff(policies[src].logprobs(*batch), after) < 1e-4  # and parity across backends
    assert max_diff(policies[src].logprobs(*batch), load_policy(out, src).logprobs(*batch)) < 1e-5


def _perturb_lora(policy, seed=0):
    """Give the adapters non-zero weights (B starts at zero)."""
    if policy.backend == "torch":
        import torch

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    else:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        mx.random.seed(seed)
        policy.model.update_modules({})
        new = [(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(policy.model.trainable_parameters())]
        assert new and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k, _ in new)
        policy.model.load_weights(new, strict=False)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_lora_merge_equals_adapter(ckpt, policies, batch, tmp_path, backend):
    policy = apply_lora(load_policy(ckpt, backend), LORA)
    assert max_diff(policy.logprobs(*batch), policies[backend].logprobs(*batch)) < 1e-6  # B = 0 at start
    _perturb_lora(policy)
    with_adapter = policy.logprobs(*batch)
    assert max_diff(with_adapter, policies[backend].logprobs(*batch)) > 1e-3

    adapter = save_adapter(policy, tmp_path / "adapter")
    assert adapter_backend(adapter) == backend
    reloaded = load_policy(ckpt, backend, lora=adapter)
    assert max_diff(with_adapter, reloaded.logprobs(*batch)) < 1e-6

    if backend == "mlx":  # the adapter folder is mlx-lm's own format
        import mlx_lm

        from rlmeta.policy.mlx_policy import MLXPolicy

        model, tok = mlx_lm.load(str(ckpt), adapter_path=str(adapter))
        assert max_diff(with_adapter, MLXPolicy(model, tok, policy.config).logprobs(*batch)) < 1e-6

    merged = merge_lora(ckpt, adapter, tmp_path / "merged")
    for b in ("mlx", "torch"):
        assert max_diff(with_adapter, load_policy(merged, b).logprobs(*batch)) < 1e-4
    saved = policy.save(tmp_path / "saved")  # save() merges too
    assert max_diff(with_adapter, load_policy(saved, backend).logprobs(*batch)) < 1e-5


def test_torch_merged_checkpoint_opens_in_mlx_lm(ckpt, batch, tmp_path):
    import mlx_lm

    policy = apply_lora(load_policy(ckpt, "torch"), LORA)
    _perturb_lora(policy, seed=1)
    merged = merge_lora(ckpt, save_adapter(policy, tmp_path / "adapter"), tmp_path / "merged")
    model, tok = mlx_lm.load(str(merged))
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] > 0
    text = mlx_lm.generate(model, tok, tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                add_generation_prompt=True), max_tokens=3)
    assert isinstance(text, str)


def test_merge_lora_cli(ckpt, tmp_path, capsys):
    policy = apply_lora(load_policy(ckpt, "mlx"), LORA)
    adapter = save_adapter(policy, tmp_path / "adapter")
    assert main(["merge-lora", "--model", str(ckpt), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert str(tmp_path / "m") in capsys.readouterr().out
