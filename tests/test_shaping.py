"""How a draw is shaped besides the temperature: top-k, top-p, min-p and the repetition penalty, on both
backends (rlmeta.policy.base.Shaping), against hand-computed values and transformers' own processors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rlmeta.policy import load_policy
from rlmeta.policy import torch_policy as TP
from rlmeta.policy.base import Shaping
from rlmeta.testing.models import cached_checkpoint, messages, questions

mx = pytest.importorskip("mlx.core")
from rlmeta.policy import mlx_policy as MP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGITS = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],
                   [-0.5, 3.0, 2.9, -2.0, 0.1, 1.0]], dtype=np.float32)


def kept(logits: np.ndarray) -> list[list[int]]:
    return [sorted(np.flatnonzero(np.isfinite(row)).tolist()) for row in logits]


def reference_keep(row: np.ndarray, s: Shaping) -> list[int]:
    """By hand: top-k, then top-p over the renormalised rest, then min-p relative to the top token."""
    order = np.argsort(-row)
    keep = order[:s.top_k] if s.top_k else order
    p = np.exp(row[keep] - row[keep].max())
    p /= p.sum()
    if s.top_p < 1.0:
        before = np.cumsum(p) - p  # mass of the tokens ranked above
        keep, p = keep[before < s.top_p], p[before < s.top_p]
        p /= p.sum()
    if s.min_p > 0:
        keep = keep[p >= s.min_p * p.max()]
    return sorted(keep.tolist())


@pytest.mark.parametrize("shaping", [Shaping(top_k=2), Shaping(top_k=3, top_p=0.8), Shaping(top_p=0.6),
                                     Shaping(min_p=0.3), Shaping(top_k=4, top_p=0.95, min_p=0.2), Shaping()])
def test_filters_keep_the_hand_computed_tokens_on_both_backends(shaping):
    expect = [reference_keep(row, shaping) for row in LOGITS]
    torch_kept = kept(TP.shape(torch.from_numpy(LOGITS.copy()), shaping).numpy())
    lp = mx.array(LOGITS) - mx.logsumexp(mx.array(LOGITS), axis=-1, keepdims=True)
    mlx_kept = kept(np.array(MP.shape(lp, shaping)))
    assert torch_kept == mlx_kept == expect
    if shaping.top_k == 2:
        assert expect == [[0, 1], [1, 2]]


def test_repetition_penalty_is_transformers_rule_on_both_backends():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = torch.tensor([[0, 4, 4], [2, 3, 1]])
    seen = torch.zeros(2, 6, dtype=torch.bool)
    seen[torch.arange(2)[:, None], ids] = True
    hf = RepetitionPenaltyLogitsProcessor(1.5)(ids, torch.from_numpy(LOGITS.copy())).numpy()
    ours = TP.penalize(torch.from_numpy(LOGITS.copy()), seen, 1.5).numpy()
    theirs = np.array(MP.penalize(mx.array(LOGITS), mx.array(seen.numpy()), 1.5))
    np.testing.assert_allclose(ours, hf, rtol=1e-6)
    np.testing.assert_allclose(theirs, hf, rtol=1e-6)
    assert ours[0, 0] == pytest.approx(2.0 / 1.5) and ours[0, 4] == pytest.approx(-1.5) and ours[0, 1] == 1.0


@pytest.fixture(scope="module")
def policies(pytestconfig):
    ckpt = cached_checkpoint(pytestconfig, "tiny")
    return {b: load_policy(ckpt, b) for b in ("mlx", "torch")}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_top_k_1_and_min_p_1_sample_the_greedy_tokens_and_log_probs_stay_the_models(policies, backend):
    policy, prompts = policies[backend], messages(questions(3))
    greedy = policy.generate(prompts, 1, temperature=0, max_new_tokens=8, seed=0)
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        drawn = policy.generate(prompts, 2, temperature=1.0, max_new_tokens=8, seed=5, **kw)
        assert [g.token_ids for g in drawn] == [g.token_ids for g in greedy for _ in range(2)], kw
        # the recorded log-probs are the model's at T=1, not of the truncated distribution (which would be 0)
        tf = policy.logprobs([g.prompt_ids for g in drawn], [g.token_ids for g in drawn], temperature=1.0)
        for g, lp in zip(drawn, tf):
            np.testing.assert_allclose(g.logprobs, lp, atol=1e-4, rtol=0)
        assert min(min(g.logprobs) for g in drawn) < -1e-3


def greedy_with_penalty_by_hand(model, prompt_ids: list[int], penalty: float, steps: int) -> list[int]:
    """Greedy decoding without a cache: the full sequence forwarded each step, transformers' own
    RepetitionPenaltyLogitsProcessor over every token so far, argmax."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    proc, ids = RepetitionPenaltyLogitsProcessor(penalty), list(prompt_ids)
    for _ in range(steps):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[:, -1].float()
        ids.append(int(proc(x, logits).argmax(-1)))
    return ids[len(prompt_ids):]


def test_greedy_with_a_repetition_penalty_matches_transformers_and_mlx_agrees(policies):
    prompts = messages(questions(2))
    torch_policy = policies["torch"]
    runs = {b: p.generate(prompts, 1, temperature=0, repetition_penalty=2.0, max_new_tokens=6, seed=0)
            for b, p in policies.items()}
    plain = torch_policy.generate(prompts, 1, temperature=0, max_new_tokens=6, seed=0)
    for g in runs["torch"]:
        by_hand = greedy_with_penalty_by_hand(torch_policy.model, g.prompt_ids, 2.0, len(g.token_ids))
        assert g.token_ids == by_hand
    assert [g.token_ids for g in runs["mlx"]] == [g.token_ids for g in runs["torch"]]
    assert [g.token_ids for g in runs["torch"]] != [g.token_ids for g in plain]  # the penalty changed the draw


def test_eval_shaping_falls_back_to_training_and_trl_gets_it(tmp_path):
    from rlmeta.rl import trl_trainer as T
    from rlmeta.settings import Experiment, RLJob

    exp = {"dataset": "gsm8k", "prompt": "xml_cot", "model": "tiny", "backend": "torch", "algorithm": "grpo",
           "rewards": {"xml_strict": 1.0}, "train": {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}}
    s = Experiment.model_validate({**exp, "eval": {"top_k": 0}}).sampling(seed=1)
    assert (s.top_k, s.min_p, s.repetition_penalty, s.top_p) == (0, 0.05, 1.1, 1.0)
    c = T.grpo_config(RLJob.model_validate({k: exp[k] for k in ("algorithm", "rewards", "train")}), tmp_path)
    assert (c.top_k, c.min_p, c.repetition_penalty) == (20, 0.05, 1.1)
