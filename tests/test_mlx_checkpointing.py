"""train.gradient_checkpointing on MLX (rlmeta.policy.mlx_compat.checkpointed_layers, mlx-lm's grad_checkpoint):
the same loss and gradients with less peak memory on the padded path, and the layer class restored afterwards."""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

from rlmeta.policy import load_policy, mlx_packed  # noqa: E402
from rlmeta.policy.mlx_compat import checkpointed_layers  # noqa: E402
from rlmeta.policy.mlx_policy import pad_batch, sequence_logprobs  # noqa: E402
from rlmeta.testing.models import cached_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def policy(pytestconfig):
    path = cached_checkpoint(pytestconfig, "ckpt-4layers", hidden=64, layers=4, teach_stop=False)
    return load_policy(path, "mlx", dtype="float32")


def loss_and_grads(policy, checkpointing: bool):
    import mlx.nn as nn

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, 40).tolist() for _ in range(8)]
    completions = [rng.integers(3, 200, 160).tolist() for _ in range(8)]
    ids, plen, mask = pad_batch(prompts, completions)

    def loss(model):
        return -(sequence_logprobs(model, ids, plen, mask) * mask).sum() / mask.sum()

    mx.eval(policy.model.parameters())
    mx.reset_peak_memory()
    with checkpointed_layers(policy.model, checkpointing):
        value, grads = nn.value_and_grad(policy.model, loss)(policy.model)
    mx.eval(value, grads)
    return float(value), dict(tree_flatten(grads)), mx.get_peak_memory()


def test_same_gradients_less_memory_and_class_restored(policy, monkeypatch):
    monkeypatch.setattr(mlx_packed, "HOST_GEMM", False)  # the padded path (Metal's; the CPU fast path ignores it)
    cls = type(policy.model.model.layers[0])
    call = cls.__call__
    plain_loss, plain_grads, plain_peak = loss_and_grads(policy, False)
    ckpt_loss, ckpt_grads, ckpt_peak = loss_and_grads(policy, True)
    assert cls.__call__ is call  # sampling, the KL reference and other models keep the plain layer
    assert abs(ckpt_loss - plain_loss) < 1e-6
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, g in plain_grads.items():
        np.testing.assert_allclose(np.array(ckpt_grads[name]), np.array(g), rtol=1e-5, atol=1e-7, err_msg=name)
    # 4 layers x (8 x 200 tokens): the stored activations are what recomputation saves
    assert ckpt_peak < 0.8 * plain_peak, (ckpt_peak, plain_peak)
