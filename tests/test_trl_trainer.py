"""rlmeta.rl.trl_trainer: GRPOConfig mapping, a learning proof on a toy reward (and its failing
counterpart), the final checkpoint in transformers and mlx_lm, train_metrics, GSPO + LoRA + resume."""
from __future__ import annotations

import json
import logging
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmeta import rewards as R
from rlmeta.io import write_table
from rlmeta.models.build import build_tiny_model
from rlmeta.rl import trl_trainer as T
from rlmeta.tables import PROMPTS, TRAIN_METRICS_BASE
from test_tracking import FAKE_KEY, wandb_records_when_flushed

TARGET = "a"
WORDS = ["cats", "dogs", "food", "balls"]
PROOF_TRAIN = {  # strong signal, short completions: ~0.15 s/step on an idle 2-core CPU
    "steps": 20, "batch_prompts": 4, "group_size": 8, "learning_rate": 3e-2, "max_new_tokens": 8,
    "temperature": 1.0, "checkpoint_every": 10,
}


def toy_a(completion, reference=None, prompt=None, **_):
    """Share of the completion's non-space characters that are the letter 'a' (max 1.0)."""
    s = completion.replace(" ", "")
    return sum(c == TARGET for c in s) / max(1, len(s))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared CPU spin-waiting threads
    make every step several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_reward():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(R.REGISTRY, "toy_a", R.RewardSpec("toy_a", toy_a, "share of 'a' characters"))
        yield "toy_a"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3 (BPE vocab 300 -> 320 rows) and a prompts.parquet with 16 train prompts."""
    root = tmp_path_factory.mktemp("trl")
    corpus = root / "corpus.jsonl"
    words = "the cat sat on a mat and ate some food while the dog ran in the park with 12 red balls".split()
    corpus.write_text("".join(json.dumps({"question": " ".join(words[i % 7:] + words[:i % 7]), "answer": str(i)}) + "\n"
                              for i in range(200)))
    model = build_tiny_model(root / "model", {"tokenizer": "bpe", "vocab_size": 300}, [corpus], seed=0)
    rows = [dict(prompt_id=f"p{i}", experiment="toy", item_id=f"i{i}", task="t", split=split,
                 prompt=[{"role": "user", "content": f"write {w} {i}"}], reference=str(i), reference_completion=None)
            for i, (w, split) in enumerate([(w, "train") for w in WORDS * 4] + [("eval", "eval")])]
    write_table(root / "prompts.parquet", pa.Table.from_pylist(rows, schema=PROMPTS))
    return root, model, root / "prompts.parquet"


def sampled_reward(model_dir, n_per_prompt: int = 4, seed: int = 123) -> float:
    """Mean toy_a reward of completions sampled like training does (temperature 1, 8 new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    msgs = [[{"role": "user", "content": f"write {w} {i}"}] for i, w in enumerate(WORDS * 4)]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", padding=True,
                                  return_dict=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                             num_return_sequences=n_per_prompt)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(map(toy_a, texts)) / len(texts)


def train(tiny, name, weight, report_to="none", **train_over):
    root, model, prompts = tiny
    exp = {"algorithm": "grpo", "rewards": {"toy_a": weight},
           "train": {**PROOF_TRAIN, **train_over, "trl": {"report_to": report_to}}}
    out = root / name
    final = T.train_trl(model, prompts, exp, out / "checkpoints", out / "train_metrics.parquet",
                        {"mode": "offline", "project": "rlmeta-test"}, seed=0)
    return final, out


@pytest.fixture(scope="module")
def base_reward(tiny):
    return sampled_reward(tiny[1])


@pytest.fixture(scope="module")
def trained_pos(tiny, toy_reward):
    """The proof run: reward +1 x toy_a, logged to an offline W&B run with a fake key in the env."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", FAKE_KEY)
        return train(tiny, "pos", 1.0, report_to="wandb")


@pytest.fixture(scope="module")
def trained_neg(tiny, toy_reward):
    """The same run with the advantage sign flipped (reward weight -1)."""
    return train(tiny, "neg", -1.0)


# (a) config mapping -----------------------------------------------------------------------------

def test_config_grpo_vs_gspo_epsilons_and_batches(tmp_path):
    exp = {"algorithm": "grpo", "rewards": {"xml_strict": 0.5, "gsm8k_correct": 2.0},
           "train": {"steps": 7, "batch_prompts": 3, "group_size": 4, "updates_per_batch": 2, "checkpoint_every": 5,
                     "trl": {"report_to": "none"}}}
    c = T.grpo_config(exp, tmp_path, seed=3)
    assert (c.importance_sampling_level, c.epsilon, c.epsilon_high) == ("token", 0.2, 0.28)
    assert (c.num_generations, c.per_device_train_batch_size, c.generation_batch_size) == (4, 12, 12)
    assert (c.steps_per_generation, c.num_iterations, c.max_steps, c.save_steps) == (1, 2, 14, 10)
    assert c.reward_weights == [0.5, 2.0] and c.seed == 3 and c.logging_steps == 1
    assert (c.loss_type, c.scale_rewards, c.beta, c.use_vllm) == ("dapo", "group", 0.0, False)
    assert c.use_cpu and not c.bf16 and not c.gradient_checkpointing and c.report_to == []

    g = T.grpo_config({**exp, "algorithm": "gspo"}, tmp_path)
    assert (g.importance_sampling_level, g.epsilon, g.epsilon_high) == ("sequence", 3e-4, 4e-4)
    over = {**exp, "train": {**exp["train"], "epsilon_low": 0.1, "epsilon_high": 0.3, "loss_type": "dr_grpo",
                             "scale_rewards": "none", "beta": 0.04, "max_grad_norm": None, "lr_schedule": "cosine",
                             "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 33}}
    o = T.grpo_config(over, tmp_path)
    assert (o.epsilon, o.epsilon_high, o.loss_type, o.scale_rewards, o.beta) == (0.1, 0.3, "dr_grpo", "none", 0.04)
    assert math.isinf(o.max_grad_norm) and o.lr_scheduler_type == "cosine"
    assert (o.temperature, o.top_p, o.max_completion_length) == (0.7, 0.9, 33)
    with pytest.raises(ValueError, match="grpo or gspo"):
        T.grpo_config({**exp, "algorithm": "fomaml"}, tmp_path)


def test_config_cuda_bf16_and_report_to(tmp_path):
    exp = {"algorithm": "grpo", "rewards": {"xml_strict": 1.0}}
    k = T.grpo_config_kwargs(exp, tmp_path, cuda=True)
    assert k["bf16"] and not k["use_cpu"] and k["activation_checkpointing"] and k["report_to"] == ["wandb"]
    k = T.grpo_config_kwargs({**exp, "train": {"trl": {"bf16": False, "use_vllm": True}}}, tmp_path, cuda=True)
    assert not k["bf16"] and k["use_vllm"]
    assert T.grpo_config_kwargs(exp, tmp_path, report_to="tensorboard", cuda=False)["report_to"] == ["tensorboard"]


def test_lora_config():
    assert T.lora_config(None) is None
    lc = T.lora_config({"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]})
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, set(lc.target_modules), lc.task_type) == (4, 8, 0.1, {"q_proj"},
                                                                                             "CAUSAL_LM")


def test_reward_functions_are_named_and_read_reference():
    fns = T.reward_functions({"gsm8k_correct": 1.0, "integer_answer": 0.5})
    assert [f.__name__ for f in fns] == ["gsm8k_correct", "integer_answer"]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "<reasoning>\nx\n</reasoning>\n<answer>\n42\n</answer>"}],
                   [{"role": "assistant", "content": "<answer>\nseven\n</answer>"}]]
    assert fns[0](prompts=prompts, completions=completions, reference=["42", "7"], trainer_state=None) == [1.0, 0.0]
    assert fns[1](prompts=prompts, completions=completions, reference=["42", "7"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward"):
        T.reward_functions({"nope": 1.0})


def test_train_dataset_is_the_train_split(tmp_path):
    rows = [dict(prompt_id=f"p{i}", experiment="e", item_id=f"i{i}", task="t", split=("train", "eval")[i % 2],
                 prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}],
                 reference=str(i), reference_completion=None) for i in range(6)]
    write_table(tmp_path / "p.parquet", pa.Table.from_pylist(rows, schema=PROMPTS))
    ds = T.train_dataset(tmp_path / "p.parquet")
    assert ds.column_names == ["prompt", "reference"] and ds["reference"] == ["0", "2", "4"]
    assert ds[1]["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"}]
    assert len(T.train_dataset(tmp_path / "p.parquet", max_prompts=2)) == 2


def test_metrics_callback_rows_carry_forward_and_nan_stop(tmp_path, capsys):
    from types import SimpleNamespace

    from rlmeta.tracking import MetricsWriter, NonFiniteMetricError

    path = tmp_path / "train_metrics.parquet"
    cb = T.TrainMetricsCallback(MetricsWriter(path, ["reward/toy_a"]), ["toy_a"], tmp_path / "ck")
    state = SimpleNamespace(global_step=1, max_steps=3)
    gen = {"reward": 0.5, "reward_std": 0.1, "num_tokens": 120.0, "frac_reward_zero_std": 0.25,
           "completions/mean_length": 7.0, "rewards/toy_a/mean": 0.5, "clip_ratio/region_mean": 0.0}
    cb.on_step_begin(None, state, None)
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 0.1, "grad_norm": 0.3, "learning_rate": 1e-3, **gen})
    cb.on_save(None, state, None)
    state.global_step = 2  # a reuse step (num_iterations > 1): TRL logs no sampling metrics
    cb.on_log(None, state, None, logs={"loss": 0.2, "grad_norm": 0.4, "learning_rate": 1e-3})
    cb.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": 0.1})  # end-of-training summary
    rows = pq.read_table(path).to_pylist()
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["reward_mean"] == 0.5 and rows[1]["tokens"] == 120
    assert rows[0]["zero_std_frac"] == 0.25 and rows[0]["reward/toy_a"] == 0.5 and rows[0]["kl"] is None
    assert rows[0]["step_seconds"] >= 0 and "step 2/3 loss=0.2" in capsys.readouterr().err
    state.global_step = 3
    with pytest.raises(NonFiniteMetricError, match=r"non-finite loss at step 3: loss=nan; last good checkpoint: .*"
                                                   r"checkpoint-1"):
        cb.on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": 0.4, "learning_rate": 1e-3})
    assert pq.read_table(path).num_rows == 3  # the bad row is kept for diagnosis


# (b) the proof that it learns, and that the proof can fail ------------------------------------------

@pytest.mark.slow
def test_grpo_raises_toy_reward_to_near_max(trained_pos, base_reward):
    final, _ = trained_pos
    after = sampled_reward(final)
    print(f"toy_a reward: base {base_reward:.3f} -> trained {after:.3f}")
    assert base_reward < 0.15
    assert after >= 0.85 and after - base_reward >= 0.6


@pytest.mark.slow
def test_flipped_advantage_sign_does_not_improve(trained_neg, base_reward):
    final, out = trained_neg
    after = sampled_reward(final)
    print(f"toy_a reward with weight -1: base {base_reward:.3f} -> trained {after:.3f}")
    assert after <= base_reward + 0.02
    comp = pq.read_table(out / "train_metrics.parquet").column("reward/toy_a").to_pylist()
    assert comp[-1] <= comp[0]


# (c) the checkpoint opens in transformers and mlx_lm ---------------------------------------------

@pytest.mark.slow
def test_final_checkpoint_opens_in_transformers_and_mlx(trained_pos, tiny):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, _ = trained_pos
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    cfg = json.loads((final / "config.json").read_text())
    base_cfg = json.loads((tiny[1] / "config.json").read_text())
    assert cfg["use_cache"] is True and cfg.get("pad_token_id") == base_cfg.get("pad_token_id")
    assert cfg["rope_theta"] == 10000.0 and cfg["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "write cats 0"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        pt = AutoModelForCausalLM.from_pretrained(final)(torch.tensor([ids])).logits[0, -1].numpy()

    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm not installed: cannot check the MLX load")
    import mlx.core as mx

    model, mtok = mlx_lm.load(str(final))
    assert mtok.apply_chat_template([{"role": "user", "content": "write cats 0"}], add_generation_prompt=True) == ids
    mx_logits = np.array(model(mx.array([ids]))[0, -1])
    assert np.abs(mx_logits - pt[: mx_logits.shape[0]]).max() < 1e-3
    assert int(mx_logits.argmax()) == int(pt.argmax())


# (d) train_metrics and W&B ---------------------------------------------------------------------------

@pytest.mark.slow
def test_train_metrics_columns_and_finite(trained_pos):
    _, out = trained_pos
    t = pq.read_table(out / "train_metrics.parquet")
    assert t.column_names == [n for n, _ in TRAIN_METRICS_BASE] + ["reward/toy_a"]
    rows = t.to_pylist()
    assert [r["step"] for r in rows] == list(range(1, PROOF_TRAIN["steps"] + 1))
    for col in ("loss", "reward_mean", "reward_std", "clip_ratio", "grad_norm", "lr", "tokens", "step_seconds",
                "zero_std_frac", "completion_len_mean", "reward/toy_a"):
        vals = [r[col] for r in rows]
        assert all(v is not None and math.isfinite(v) for v in vals), (col, vals)
    assert all(r["kl"] is None for r in rows)  # beta = 0: TRL computes no KL
    assert rows[0]["lr"] == pytest.approx(3e-2)
    assert all(a < b for a, b in zip([r["tokens"] for r in rows], [r["tokens"] for r in rows][1:]))
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"] and rows[-1]["reward/toy_a"] == pytest.approx(rows[-1]["reward_mean"])


@pytest.mark.slow
def test_wandb_offline_run_has_trl_metrics_and_no_key(trained_pos):
    _, out = trained_pos
    files = list((out / "checkpoints" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = wandb_records_when_flushed(files[0])
    keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for i in r.history.item}
    assert {"train/reward", "train/loss", "train/rewards/toy_a/mean"} <= keys
    leaked = [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"


# (e) GSPO + LoRA through the command line, then resume --------------------------------------------------

@pytest.mark.slow
def test_gspo_lora_cli_two_steps_and_resume(tiny, toy_reward, capfd, caplog):
    import torch
    from safetensors.torch import load_file

    root, model, prompts = tiny
    exp = {"algorithm": "gspo", "rewards": {"toy_a": 1.0},
           "train": {**PROOF_TRAIN, "steps": 2, "checkpoint_every": 1, "learning_rate": 1e-2,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "trl": {"report_to": "none"}}}
    out = root / "gspo"
    argv = ["--model", str(model), "--prompts", str(prompts), "--experiment-json", json.dumps(exp),
            "--out", str(out / "checkpoints"), "--metrics", str(out / "train_metrics.parquet"), "--seed", "1",
            "--wandb-mode", "disabled", "--wandb-project", "rlmeta-test"]
    caplog.set_level(logging.INFO, logger=T.__name__)
    assert T.main(argv) == 0
    assert "step 1/2" in capfd.readouterr().err
    args = torch.load(out / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (args.importance_sampling_level, args.epsilon, args.epsilon_high) == ("sequence", 3e-4, 4e-4)
    merged, base = load_file(out / "checkpoints" / "final" / "model.safetensors"), load_file(model / "model.safetensors")
    assert set(merged) == set(base), "LoRA weights left in the final checkpoint"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q]) and torch.equal(merged["model.embed_tokens.weight"],
                                                                base["model.embed_tokens.weight"])
    assert pq.read_table(out / "train_metrics.parquet").column("step").to_pylist() == [1, 2]

    first = (out / "checkpoints" / "final" / "model.safetensors").read_bytes()

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")  # as if killed after step 1: resume trains step 2
    caplog.clear()
    assert T.main(argv) == 0
    err = capfd.readouterr().err
    assert "resuming" in caplog.text and "step 2/2" in err and "step 1/2" not in err
    assert pq.read_table(out / "train_metrics.parquet").column("step").to_pylist() == [1, 2]
    assert (out / "checkpoints" / "final" / "model.safetensors").read_bytes() == first  # same seed, same result

    caplog.clear()
    assert T.main(argv) == 0  # finished: the final policy is rebuilt from checkpoint-2, nothing trained
    assert "resuming" in caplog.text and "step " not in capfd.readouterr().err
    assert pq.read_table(out / "train_metrics.parquet").column("step").to_pylist() == [1, 2]
    assert (out / "checkpoints" / "final" / "model.safetensors").read_bytes() == first

    exp["train"]["learning_rate"] = 5e-3  # a changed spec must not resume from the old checkpoints
    caplog.clear()
    assert T.main([*argv[:5], json.dumps(exp), *argv[6:]]) == 0
    assert "resuming" not in caplog.text and "step 1/2" in capfd.readouterr().err
