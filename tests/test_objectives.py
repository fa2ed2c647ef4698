"""The GRPO/GSPO objective: NumPy reference vs MLX vs finite differences vs TRL's own loss."""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlmeta.rl import objectives as ref

mx = pytest.importorskip("mlx.core")
from rlmeta.rl import objectives_mlx as mob  # noqa: E402

LEVELS = ["token", "sequence"]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
SHAPES = [(2, 3, 5), (3, 4, 9), (1, 6, 16)]  # (prompts, group size, completion tokens)


def make_batch(prompts, group, t, level, seed, with_ref=True, empty_row=False):
    """Random log-probs with padding; ratios spread across both sides of the clip range."""
    rng = np.random.default_rng(seed)
    n = prompts * group
    logp = -rng.uniform(0.05, 3.0, (n, t))
    if level == "token":
        old = logp + rng.normal(0, 0.3, (n, t))
    else:  # GSPO clips the sequence ratio at 1 - 3e-4 / 1 + 4e-4
        old = logp + rng.normal(0, 1e-3, (n, 1)) + rng.normal(0, 1e-3, (n, t))
    refp = logp + rng.normal(0, 0.3, (n, t)) if with_ref else None
    lengths = rng.integers(1, t + 1, n)
    lengths[0] = t
    if empty_row:
        lengths[-1] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    adv = ref.group_advantages(rng.normal(size=n), group)
    return logp, old, refp, adv, mask


def numpy_loss(logp, old, refp, adv, mask, **kw):
    return ref.policy_loss(logp, old, refp, adv, mask, **kw)


def mlx_loss(logp, old, refp, adv, mask, **kw):
    a = lambda x: None if x is None else mx.array(np.asarray(x, np.float32))
    args = (a(old), a(refp), a(adv), a(mask))
    loss, metrics = mob.policy_loss(a(logp), *args, **kw)
    grad = mx.grad(lambda lp: mob.policy_loss(lp, *args, **kw)[0])(a(logp))
    return loss.item(), metrics, np.array(grad)


def fd_grad(logp, old, refp, adv, mask, h=1e-6, **kw):
    """Central finite differences of the NumPy reference w.r.t. logp."""
    g = np.zeros_like(logp)
    for idx in np.ndindex(*logp.shape):
        up, dn = logp.copy(), logp.copy()
        up[idx] += h
        dn[idx] -= h
        diff = numpy_loss(up, old, refp, adv, mask, **kw)[0] - numpy_loss(dn, old, refp, adv, mask, **kw)[0]
        g[idx] = diff / (2 * h)
    return g


def assert_metrics_close(a, b, rtol, atol):
    assert a.keys() == b.keys() == {"ratio", "clip_ratio", "clip_ratio/low", "clip_ratio/high", "kl"}
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=rtol, abs=atol), k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_mlx_agrees_with_the_reference(shape, loss_type, level, beta):
    seed = zlib.crc32(repr((shape, loss_type, level, beta)).encode())
    batch = make_batch(*shape, level, seed, with_ref=beta > 0, empty_row=shape == SHAPES[1])
    kw = dict(level=level, beta=beta, loss_type=loss_type, max_completion_length=shape[2] + 3)
    loss_np, met_np = numpy_loss(*batch, **kw)
    loss_m, met_m, grad_m = mlx_loss(*batch, **kw)

    assert loss_m == pytest.approx(loss_np, rel=1e-4, abs=1e-5)
    assert_metrics_close(met_m, met_np, 1e-4, 1e-5)
    # the batch really exercises clipping on both sides (token level) and some clipping (sequence)
    assert met_np["clip_ratio"] > 0 and 0 < met_np["ratio"] < 2

    np.testing.assert_allclose(grad_m, fd_grad(*batch, **kw), rtol=1e-3, atol=1e-6)
    assert np.all(grad_m[batch[4] == 0] == 0)  # padding gets no gradient


@pytest.mark.parametrize("kl_correction", [True, False])
@pytest.mark.parametrize("level", LEVELS)
def test_kl_correction_and_ref_without_beta(kl_correction, level):
    batch = make_batch(2, 4, 7, level, seed=7)
    for beta in (0.0, 0.1):
        kw = dict(level=level, beta=beta, loss_type="bnpo", kl_correction=kl_correction)
        loss_np, met_np = numpy_loss(*batch, **kw)
        loss_m, met_m, grad_m = mlx_loss(*batch, **kw)
        assert loss_m == pytest.approx(loss_np, rel=1e-4, abs=1e-6)
        assert met_np["kl"] > 0 and met_m["kl"] == pytest.approx(met_np["kl"], rel=1e-4)
        np.testing.assert_allclose(grad_m, fd_grad(*batch, **kw), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy_old_logp_none_is_detached_logp(level):
    logp, _, _, adv, mask = make_batch(2, 3, 6, level, seed=3, with_ref=False)
    _, met = ref.policy_loss(logp, None, None, adv, mask, level=level, loss_type="grpo")
    assert met["ratio"] == 1.0 and met["clip_ratio"] == 0.0 and math.isnan(met["kl"])
    a = lambda x: mx.array(np.asarray(x, np.float32))
    kw = dict(level=level, loss_type="grpo")
    loss_none, met_m = mob.policy_loss(a(logp), None, None, a(adv), a(mask), **kw)
    assert met_m["ratio"] == pytest.approx(1.0) and met_m["clip_ratio"] == 0.0 and math.isnan(met_m["kl"])
    g_none = mx.grad(lambda x: mob.policy_loss(x, None, None, a(adv), a(mask), **kw)[0])(a(logp))
    g_copy = mx.grad(lambda x: mob.policy_loss(x, mx.stop_gradient(x), None, a(adv), a(mask), **kw)[0])(a(logp))
    np.testing.assert_array_equal(np.array(g_none), np.array(g_copy))
    assert float(mx.abs(g_none).sum()) > 0
    # on-policy, the ratio's gradient is the gradient of logp itself: the finite differences agree
    fd = fd_grad(logp, logp, None, adv, mask, **kw)  # old = logp held fixed
    np.testing.assert_allclose(np.array(g_none), fd, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- hand-checked cases

@pytest.mark.parametrize("impl", ["numpy", "mlx"])
@pytest.mark.parametrize("level", LEVELS)
def test_ratio_one_unit_advantage_gives_minus_one(impl, level):
    logp = np.log(np.full((2, 4), 0.5))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], float)
    adv = np.ones(2)
    if impl == "numpy":
        loss, _ = ref.policy_loss(logp, logp, None, adv, mask, level=level, loss_type="grpo")
    else:
        a = lambda x: mx.array(np.asarray(x, np.float32))
        loss = mob.policy_loss(a(logp), a(logp), None, a(adv), a(mask), level=level, loss_type="grpo")[0].item()
    assert loss == pytest.approx(-1.0)


def test_aggregations_by_hand():
    # on-policy: per-token loss is -A; row 0 has 3 tokens with A=1, row 1 has 1 token with A=-2
    logp = np.zeros((2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], float)
    adv = np.array([1.0, -2.0])
    loss = lambda lt, **kw: ref.policy_loss(logp, None, None, adv, mask, loss_type=lt, **kw)[0]
    assert loss("grpo") == pytest.approx((-1 + 2) / 2)
    assert loss("bnpo") == pytest.approx((-3 + 2) / 4)
    assert loss("dapo") == pytest.approx((-3 + 2) / 4)
    assert loss("dapo", num_items=10) == pytest.approx((-3 + 2) / 10)
    assert loss("dr_grpo", max_completion_length=8) == pytest.approx((-3 + 2) / (2 * 8))
    assert loss("dr_grpo") == pytest.approx((-3 + 2) / (2 * 4))  # defaults to the padded width


def test_dapo_micro_batches_sum_to_full_batch():
    logp, old, _, adv, mask = make_batch(2, 4, 6, "token", seed=11, with_ref=False)
    full, _ = ref.policy_loss(logp, old, None, adv, mask, loss_type="dapo")
    total = mask.sum()
    parts = [ref.policy_loss(logp[s], old[s], None, adv[s], mask[s], loss_type="dapo", num_items=total)[0]
             for s in (slice(0, 3), slice(3, 8))]
    assert sum(parts) == pytest.approx(full)


@pytest.mark.parametrize("level", LEVELS)
def test_clipped_tokens_get_no_gradient(level):
    eps_low, eps_high = ref.default_epsilons("gspo" if level == "sequence" else "grpo")
    big, small = (0.5, -0.5) if level == "token" else (5e-3, -5e-3)
    # rows: ratio too high with A>0 (clipped), too low with A<0 (clipped), too high with A<0 (not clipped)
    logp = np.zeros((3, 4))
    old = np.array([[-big] * 4, [-small] * 4, [-big] * 4])
    adv = np.array([1.0, -1.0, -1.0])
    mask = np.ones((3, 4))
    _, met = ref.policy_loss(logp, old, None, adv, mask, level=level, loss_type="bnpo")
    a = lambda x: mx.array(np.asarray(x, np.float32))
    grad = np.array(mx.grad(lambda x: mob.policy_loss(x, a(old), None, a(adv), a(mask), level=level,
                                                      loss_type="bnpo")[0])(a(logp)))
    assert np.all(grad[:2] == 0)
    assert np.all(grad[2] > 0)  # pessimistic bound keeps the unclipped term for A<0
    np.testing.assert_allclose(grad, fd_grad(logp, old, None, adv, mask, level=level, loss_type="bnpo"),
                               rtol=1e-4, atol=1e-7)
    assert met["clip_ratio/high"] == pytest.approx(1 / 3) and met["clip_ratio/low"] == pytest.approx(1 / 3)
    assert met["clip_ratio"] == pytest.approx(2 / 3)
    assert math.exp(big) > 1 + eps_high and math.exp(small) < 1 - eps_low


def test_gspo_ratio_is_exp_of_masked_mean():
    rng = np.random.default_rng(0)
    logp, old = -rng.uniform(0, 2, (1, 6)), -rng.uniform(0, 2, (1, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0]], float)
    logp[0, 4:] = 50.0  # padding must not leak into the ratio
    expected = math.exp(np.mean(logp[0, :4] - old[0, :4]))
    _, met = ref.policy_loss(logp, old, None, np.ones(1), mask, level="sequence")
    assert met["ratio"] == pytest.approx(expected)
    a = lambda x: mx.array(np.asarray(x, np.float32))
    _, met_m = mob.policy_loss(a(logp), a(old), None, a(np.ones(1)), a(mask), level="sequence")
    assert met_m["ratio"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kl_correction", [True, False])
def test_k3_kl_zero_at_reference_positive_elsewhere(kl_correction):
    logp = -np.random.default_rng(1).uniform(0.1, 2, (2, 5))
    mask = np.ones((2, 5))
    kw = dict(beta=0.1, kl_correction=kl_correction)
    _, met = ref.policy_loss(logp, None, logp, np.zeros(2), mask, **kw)
    assert met["kl"] == 0.0
    loss, met = ref.policy_loss(logp, None, logp + 0.3, np.zeros(2), mask, **kw)
    d = 0.3
    assert met["kl"] == pytest.approx(math.exp(d) - d - 1) and loss == pytest.approx(0.1 * met["kl"])


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    none = ref.group_advantages(r, 4, "none")
    np.testing.assert_allclose(none, r - np.repeat(r.reshape(3, 4).mean(1), 4))  # Dr. GRPO: not normalised
    group = ref.group_advantages(r.reshape(3, 4), 4, "group")
    assert group.shape == (3, 4)
    np.testing.assert_allclose(group[1], 0.0)  # equal rewards -> zero advantage
    np.testing.assert_allclose(group[[0, 2]].std(axis=1, ddof=1), 1.0, rtol=1e-3)
    batch = ref.group_advantages(r, 4, "batch")
    np.testing.assert_allclose(batch, none / (r.std(ddof=1) + 1e-4))
    for scale in ("group", "batch", "none"):
        expected = ref.group_advantages(r, 4, scale)
        got_m = np.array(mob.group_advantages(mx.array(r.astype(np.float32)), 4, scale))
        np.testing.assert_allclose(got_m, expected, rtol=1e-5, atol=1e-5)


def test_defaults_and_errors():
    assert ref.default_epsilons("grpo") == (0.2, 0.28)
    assert ref.default_epsilons("gspo") == (3e-4, 4e-4)
    with pytest.raises(ValueError):
        ref.default_epsilons("fomaml")
    x, m = np.zeros((1, 2)), np.ones((1, 2))
    with pytest.raises(ValueError, match="beta"):
        ref.policy_loss(x, x, None, np.ones(1), m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        ref.policy_loss(x, x, None, np.ones(1), m, loss_type="ppo")
    with pytest.raises(ValueError, match="scale"):
        ref.group_advantages(np.ones(4), 2, "std")


# ---------------------------------------------------------------- against TRL itself

def trl_loss(batch, level, loss_type, beta, eps_low, eps_high, max_len, kl_correction):
    """Run trl's GRPOTrainer._compute_loss on a stub trainer with the log-probs given directly."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logp, old, refp, adv, mask = (None if a is None else torch.tensor(a) for a in batch)
    logp.requires_grad_(True)
    n, t = mask.shape
    tr = grpo.GRPOTrainer.__new__(grpo.GRPOTrainer)
    identity = lambda x, **_: x
    tr.__dict__.update(
        loss_type=loss_type, importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
        beta=beta, max_completion_length=max_len, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=kl_correction, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, reduce=identity, gather=identity, gather_for_metrics=identity),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = dict(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                  completion_ids=torch.zeros(n, t, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=refp,
                  num_items_in_batch=mask.sum())
    loss = tr._compute_loss(None, inputs)
    loss.backward()
    m = tr._metrics["train"]
    metrics = {"clip_ratio": m["clip_ratio/region_mean"][0], "clip_ratio/low": m["clip_ratio/low_mean"][0],
               "clip_ratio/high": m["clip_ratio/high_mean"][0], "kl": m["kl"][0] if beta else math.nan}
    return loss.item(), metrics, logp.grad.numpy()


@pytest.mark.slow
def test_matches_trl_compute_loss():
    for level in LEVELS:
        for loss_type in LOSS_TYPES:
            for beta, kl_correction in ((0.0, True), (0.04, True), (0.04, False)):
                batch = make_batch(2, 4, 7, level, seed=5, with_ref=beta > 0)
                eps = ref.default_epsilons("gspo" if level == "sequence" else "grpo")
                loss_trl, met_trl, grad_trl = trl_loss(batch, level, loss_type, beta, *eps, 10, kl_correction)
                kw = dict(level=level, loss_type=loss_type, beta=beta, max_completion_length=10,
                          kl_correction=kl_correction)
                loss_np, met_np = numpy_loss(*batch, **kw)
                assert loss_np == pytest.approx(loss_trl, rel=1e-9, abs=1e-12), (level, loss_type, beta)
                # TRL's autograd gradient against the reference's central differences
                np.testing.assert_allclose(grad_trl, fd_grad(*batch, **kw), rtol=1e-5, atol=1e-8)
                assert met_np["clip_ratio"] > 0, (level, loss_type, beta)  # the clip branch is compared too
                for k, v in met_trl.items():  # TRL averages clip flags in float32
                    assert (math.isnan(v) and math.isnan(met_np[k])) or met_np[k] == pytest.approx(v, rel=1e-6), k


def test_half_precision_logp_is_upcast():
    logp, old, _, adv, mask = make_batch(2, 4, 300, "sequence", seed=2, with_ref=False)
    expected, _ = ref.policy_loss(logp, old, None, adv, mask, level="sequence", loss_type="dapo")
    lm, om = mx.array(logp).astype(mx.bfloat16), mx.array(old).astype(mx.bfloat16)
    kw = dict(level="sequence", loss_type="dapo")
    loss_m, _ = mob.policy_loss(lm, om, None, mx.array(adv), mx.array(mask), **kw)
    assert loss_m.dtype == mx.float32
    grad = mx.grad(lambda x: mob.policy_loss(x, om, None, mx.array(adv), mx.array(mask), **kw)[0])(lm)
    assert grad.dtype == mx.bfloat16
    # the bfloat16 inputs, then float32 arithmetic: the reference on the same rounded inputs
    rounded = [np.array(x.astype(mx.float32)).astype(np.float64) for x in (lm, om)]
    on_rounded, _ = ref.policy_loss(*rounded, None, adv, mask, **kw)
    assert abs(loss_m.item() - on_rounded) < 1e-6 and abs(loss_m.item() - expected) < 0.05
