"""MLX GRPO/GSPO trainer: it learns a known task, resumes exactly, guards NaN, saves a shared checkpoint.

The toy task: a tiny random Qwen3 (BPE vocabulary of ~300 tokens, so each of the 10 single-digit
tokens starts near 1/300 per position) is rewarded by the share of digits in its completion. The
answer is known (emit digits only: reward 1.0); the base policy scores ~0.03.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

mx = pytest.importorskip("mlx.core")

from rlmeta.config import ROOT  # noqa: E402
from rlmeta.io import write_records  # noqa: E402
from rlmeta.rewards import REGISTRY, RewardSpec  # noqa: E402
from rlmeta.rl import mlx_state  # noqa: E402
from rlmeta.rl.mlx_trainer import MLXTrainer, main, train_mlx  # noqa: E402
from rlmeta.tables import PROMPTS  # noqa: E402
from rlmeta.tracking import NonFiniteMetricError  # noqa: E402

TINY = {"tokenizer": "bpe", "vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
        "num_kv_heads": 1, "intermediate_size": 64}
OFF = {"mode": "disabled"}


def digit_share(completion, reference=None, prompt=None, **_):
    chars = [c for c in completion if not c.isspace()]
    return sum(c.isdigit() for c in chars) / max(1, len(chars))


@pytest.fixture(scope="module", autouse=True)
def toy_reward():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REGISTRY, "toy_digits", RewardSpec("toy_digits", digit_share, "share of digit characters"))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlmeta.models.build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", TINY, [ROOT / "resources/gsm8k/train.jsonl"], 0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt_id": f"p{i}", "experiment": "toy", "item_id": f"i{i}", "task": f"t{i}",
             "split": "train" if i < 8 else "eval",
             "prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": f"go {i}"}],
             "reference": None, "reference_completion": None} for i in range(10)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    write_records(path, rows, PROMPTS)
    return path


def experiment(algorithm="grpo", reward=1.0, **train):
    t = {"steps": 30, "batch_prompts": 4, "group_size": 8, "learning_rate": 1e-2, "max_new_tokens": 8,
         "checkpoint_every": 1000, **train}
    return {"algorithm": algorithm, "rewards": {"toy_digits": reward}, "reward_params": {}, "train": t}


def run(tiny, prompts, out: Path, exp: dict, **kw) -> list[dict]:
    train_mlx(tiny, prompts, exp, out / "checkpoints", out / "train_metrics.parquet", OFF, seed=0, **kw)
    return pq.read_table(out / "train_metrics.parquet").to_pylist()


@pytest.fixture(scope="module", params=["grpo", "gspo"])
def learned(request, tiny, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"learn_{request.param}")
    # on-policy GSPO with dapo aggregation has GRPO's gradient: give it the off-policy path and another loss
    extra = {"updates_per_batch": 2, "loss_type": "grpo"} if request.param == "gspo" else {}
    return request.param, out, run(tiny, prompts, out, experiment(request.param, **extra))


def test_learns_the_toy_task(learned):
    algorithm, _, rows = learned
    r = [row["reward/toy_digits"] for row in rows]
    before, after = np.mean(r[:3]), np.mean(r[-3:])
    print(f"{algorithm}: reward {before:.3f} -> {after:.3f} in {len(r)} steps")
    assert before < 0.15 and after > 0.8, r
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert all(row["reward_mean"] == row["reward/toy_digits"] for row in rows)
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0 and all(row["kl"] is None for row in rows)


def test_negated_reward_does_not_improve(tiny, prompts, tmp_path):
    rows = run(tiny, prompts, tmp_path, experiment(reward=-1.0, steps=12))
    r = [row["reward/toy_digits"] for row in rows]
    assert np.mean(r[-3:]) < 0.03 and np.mean(r[-3:]) <= np.mean(r[:3]), r
    assert all(row["reward_mean"] == -row["reward/toy_digits"] for row in rows)


def assert_transformers_agrees(final: Path) -> None:
    """``final`` opens in mlx_lm and transformers, with the same completion log-probs (1e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlmeta.policy import load_policy

    policy = load_policy(final, "mlx")
    gens = policy.generate([[{"role": "user", "content": "go"}]], n=3, max_new_tokens=6, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    for g, lp in zip(gens, policy.logprobs([g.prompt_ids for g in gens], [g.token_ids for g in gens])):
        with torch.no_grad():
            logits = hf(torch.tensor([g.prompt_ids + g.token_ids])).logits[0, len(g.prompt_ids) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lp, ref, atol=1e-4)
        np.testing.assert_allclose(lp, g.logprobs, atol=1e-4)  # sampling and teacher forcing agree


def test_final_checkpoint_opens_in_transformers_with_same_logprobs(learned):
    assert_transformers_agrees(learned[1] / "checkpoints" / "final")


@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_second_update_moves_the_importance_ratio(tiny, prompts, algorithm):
    tr = MLXTrainer(tiny, prompts, experiment(algorithm, steps=2, updates_per_batch=2), seed=0)
    out = tr.train_step()
    first, second = out["updates"]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["clip_ratio"] == 0.0
    assert second["clip_ratio"] > 0 or abs(second["ratio"] - 1.0) > 1e-4, second
    if algorithm == "gspo":
        assert second["clip_ratio"] > 0, second  # eps 3e-4: a sequence ratio moved past the band
    assert out["lr"] == 1e-2 and math.isfinite(out["loss"])


def test_kl_to_reference_grows_with_beta(tiny, prompts):
    tr = MLXTrainer(tiny, prompts, experiment(steps=3, beta=0.1), seed=0)
    kls = [tr.train_step()["kl"] for _ in range(3)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[2] > 0, kls


def test_ued_selects_prompts_and_learns_their_scores(tiny, prompts):
    tr = MLXTrainer(tiny, prompts, experiment(steps=3, ued={"enabled": True, "staleness_weight": 0.3}), seed=0)
    picked = [tr.train_step()["indices"] for _ in range(3)]
    assert all(len(set(p)) == 4 for p in picked)
    state, seen = tr.sampler.state_dict(), set().union(*picked)
    assert state["step"] == 3 and len(seen) > 4  # unseen prompts rank first
    assert {i for i, s in enumerate(state["scores"]) if s is not None} == seen


@pytest.mark.parametrize("variant", ["full_ued_kl", "lora_gspo"])
def test_resume_ends_where_an_uninterrupted_run_does(tiny, prompts, tmp_path, variant):
    if variant == "full_ued_kl":
        exp = experiment(steps=4, checkpoint_every=2, updates_per_batch=2, beta=0.05, ued={"enabled": True},
                         lr_schedule="cosine", warmup_steps=1)
    else:
        exp = experiment("gspo", steps=4, checkpoint_every=2, updates_per_batch=2, learning_rate=3e-2,
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    straight = run(tiny, prompts, tmp_path / "a", exp)
    partial = run(tiny, prompts, tmp_path / "b", exp, stop_after=3)  # "killed" after step 3, last checkpoint 2
    assert [r["step"] for r in partial] == [1, 2, 3] and not (tmp_path / "b/checkpoints/final").exists()
    resumed = run(tiny, prompts, tmp_path / "b", exp)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight)
    a = mx.load(str(tmp_path / "a/checkpoints/final/model.safetensors"))
    b = mx.load(str(tmp_path / "b/checkpoints/final/model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert [s for s, _ in mlx_state.checkpoints(tmp_path / "b/checkpoints")] == [2, 4]
    state = json.loads((tmp_path / "b/checkpoints/4" / mlx_state.STATE_FILE).read_text())
    assert state["step"] == 4 and state["spec"]["experiment"] == json.loads(json.dumps(exp, sort_keys=True))
    if variant == "lora_gspo":  # merged: no adapter names in the final weights
        assert not any("lora" in k for k in a) and (tmp_path / "b/checkpoints/2/adapter").is_dir()
        assert_transformers_agrees(tmp_path / "b/checkpoints/final")


def test_poisoned_learning_rate_stops_and_keeps_the_last_good_checkpoint(tiny, prompts, tmp_path):
    # warm-up: step 1 runs at lr 0, step 2 at 1e30 (finite weights), step 3 overflows them
    exp = experiment(steps=5, learning_rate=1e30, weight_decay=0.1, warmup_steps=1, checkpoint_every=1)
    with pytest.raises(NonFiniteMetricError, match=r"at step 3.*last good checkpoint: .*checkpoints/2"):
        run(tiny, prompts, tmp_path, exp)
    ckpts = tmp_path / "checkpoints"
    assert [s for s, _ in mlx_state.checkpoints(ckpts)] == [1, 2] and not (ckpts / "final").exists()
    assert [r["step"] for r in pq.read_table(tmp_path / "train_metrics.parquet").to_pylist()] == [1, 2, 3]


def test_cli(tiny, prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    exp = json.dumps(experiment(steps=1, batch_prompts=2, group_size=2, checkpoint_every=1))
    assert main(["--model", str(tiny), "--prompts", str(prompts), "--experiment-json", exp, "--out",
                 str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.parquet"), "--seed", "3",
                 "--wandb-mode", "disabled"]) == 0
    assert (tmp_path / "ck/final/model.safetensors").exists() and (tmp_path / "ck/1" / mlx_state.STATE_FILE).exists()
    assert "step 1/1 reward=" in capsys.readouterr().err
