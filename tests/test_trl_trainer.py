"""rlmeta.rl.trl_trainer: GRPOConfig mapping, a learning proof on a toy reward (and its failing
counterpart), the final checkpoint in transformers and mlx_lm, train_metrics, GSPO + LoRA + resume,
incomplete checkpoints, UED prompt selection, runs made to diverge stopped by the divergence guard."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmeta import checkpoints
from rlmeta.cli import main
from rlmeta.io import write_table
from rlmeta.rl import trl_trainer as T
from rlmeta.settings import LoraSettings, RLGuardSettings, RLJob, WandbSettings
from rlmeta.tables import PROMPTS, TRAIN_METRICS_BASE
from rlmeta.testing.models import assert_opens_in_transformers_and_mlx, toy_write_task
from rlmeta.testing.rewards import registered
from rlmeta.testing.wandb_files import FAKE_KEY, wandb_records_when_flushed
from rlmeta.tracking import METRICS_FILE, MetricsTable

TARGET = "a"
WORDS = ["cats", "dogs", "food", "balls"]
PROOF_TRAIN = {  # strong signal, short completions: ~0.15 s/step on an idle 2-core CPU
    "steps": 20, "batch_prompts": 4, "group_size": 8, "learning_rate": 3e-2, "max_new_tokens": 8,
    "temperature": 1.0, "checkpoint_every": 10,
}


def toy_a(completion, reference=None, prompt=None):
    """Share of the completion's non-space characters that are the letter 'a' (max 1.0)."""
    s = completion.replace(" ", "")
    return sum(c == TARGET for c in s) / max(1, len(s))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_reward():
    with registered("toy_a", toy_a, "share of 'a' characters") as name:
        yield name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3 (BPE vocab 300 -> 320 rows) and a prompts.parquet with 16 train prompts."""
    root = tmp_path_factory.mktemp("trl")
    model, prompts = toy_write_task(root, WORDS)
    return root, model, prompts


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


def job_of(weight=1.0, algorithm="grpo", report_to="none", **train_over) -> RLJob:
    return RLJob.model_validate({"algorithm": algorithm, "rewards": {"toy_a": weight},
                                 "train": {**PROOF_TRAIN, **train_over, "trl": {"report_to": report_to}}})


def train(tiny, name, weight, report_to="none", **train_over):
    root, model, prompts = tiny
    out = root / name
    final = T.train_trl(model, prompts, job_of(weight, report_to=report_to, **train_over), out / "checkpoints",
                        out / "train_metrics.parquet", WandbSettings(mode="offline", project="rlmeta-test"), seed=0)
    return final, out


def steps_of(path: Path) -> list[int]:
    return pq.read_table(path).column("step").to_pylist()


def drop_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


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
    c = T.grpo_config(RLJob.model_validate(exp), tmp_path, seed=3, run_name="unit")
    assert (c.importance_sampling_level, c.epsilon, c.epsilon_high) == ("token", 0.2, 0.28)
    assert (c.num_generations, c.per_device_train_batch_size, c.generation_batch_size) == (4, 12, 12)
    assert (c.steps_per_generation, c.num_iterations, c.max_steps, c.save_steps) == (1, 2, 14, 10)
    assert c.reward_weights == [0.5, 2.0] and c.seed == 3 and c.logging_steps == 1 and c.run_name == "unit"
    assert (c.loss_type, c.scale_rewards, c.beta, c.use_vllm) == ("dapo", "group", 0.0, False)
    assert c.use_cpu and not c.bf16 and not c.gradient_checkpointing and c.report_to == []
    assert c.lr_scheduler_type == "constant_with_warmup" and c.warmup_steps == 0 and c.learning_rate == 1e-5
    assert not c.ignore_data_skip and not c.logging_nan_inf_filter

    g = T.grpo_config(RLJob.model_validate({**exp, "algorithm": "gspo"}), tmp_path)
    assert (g.importance_sampling_level, g.epsilon, g.epsilon_high) == ("sequence", 3e-4, 4e-4)
    over = {**exp, "train": {**exp["train"], "epsilon_low": 0.1, "epsilon_high": 0.3, "loss_type": "dr_grpo",
                             "scale_rewards": "none", "beta": 0.04, "max_grad_norm": None, "lr_schedule": "cosine",
                             "warmup_steps": 2, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 33,
                             "ued": {"enabled": True}}}
    o = T.grpo_config(RLJob.model_validate(over), tmp_path)
    assert (o.epsilon, o.epsilon_high, o.loss_type, o.scale_rewards, o.beta) == (0.1, 0.3, "dr_grpo", "none", 0.04)
    assert math.isinf(o.max_grad_norm) and o.lr_scheduler_type == "cosine" and o.warmup_steps == 2 * 2
    assert (o.temperature, o.top_p, o.max_completion_length) == (0.7, 0.9, 33)
    assert o.ignore_data_skip  # the UED sampler resumes from its own state
    with pytest.raises(ValueError, match="'grpo' or 'gspo'"):
        RLJob.model_validate({**exp, "algorithm": "fomaml"})


def test_config_cuda_bf16_and_report_to(tmp_path):
    exp = {"algorithm": "grpo", "rewards": {"xml_strict": 1.0}}
    k = T.grpo_config_kwargs(RLJob.model_validate(exp), tmp_path, cuda=True)
    assert k["bf16"] and not k["use_cpu"] and k["activation_checkpointing"] and k["report_to"] == ["wandb"]
    k = T.grpo_config_kwargs(RLJob.model_validate({**exp, "train": {"trl": {"bf16": False}}}), tmp_path, cuda=True)
    assert not k["bf16"] and not k["use_vllm"]
    k = T.grpo_config_kwargs(RLJob.model_validate(exp), tmp_path, report_to="tensorboard", cuda=False)
    assert k["report_to"] == ["tensorboard"] and k["use_cpu"] and not k["bf16"]


def test_extra_reaches_grpo_config_and_owned_fields_are_exactly_those_the_workflow_sets(tmp_path):
    """train.trl.extra: any other GRPOConfig field, typed; the refused names are exactly the ones
    grpo_config_kwargs sets (so a new one there cannot be silently overridden by extra)."""
    from rlmeta.rl.trl_fields import OWNED

    exp = {"algorithm": "grpo", "rewards": {"xml_strict": 1.0}}
    layouts = [{}, {"distributed": {"strategy": "fsdp"}}, {"distributed": {"strategy": "zero3"}},
               {"trl": {"vllm": {"mode": "server"}}}]
    import importlib.util

    with pytest.MonkeyPatch.context() as mp:  # zero3 and vLLM as if deepspeed and vllm were installed
        mp.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("deepspeed", "vllm") else None)
        set_ = {k for train in layouts for k in T.grpo_config_kwargs(
            RLJob.model_validate({**exp, "train": train}), tmp_path, cuda=True)}
    assert set(OWNED) == set_
    extra = {"top_entropy_quantile": "0.2", "num_generations_eval": 2}
    job = RLJob.model_validate({**exp, "train": {"trl": {"report_to": "none", "extra": extra},
                                                 "chat_template_kwargs": {"enable_thinking": False}}})
    assert job.train.trl.extra["top_entropy_quantile"] == 0.2  # coerced to the field's type
    c = T.grpo_config(job, tmp_path)
    assert (c.top_entropy_quantile, c.num_generations_eval, c.chat_template_kwargs) == (
        0.2, 2, {"enable_thinking": False})
    assert json.loads(job.model_dump_json())["train"]["trl"]["extra"]["num_generations_eval"] == 2  # recorded


@pytest.mark.parametrize("extra,message", [
    ({"learning_rate": 1e-3}, "'learning_rate' is set by train.learning_rate: set it there, not in train.trl.extra"),
    ({"num_generations": 4}, "'num_generations' is set by train.group_size"),
    ({"top_entropy_quantil": 0.2}, r"'top_entropy_quantil' is not a field of trl.GRPOConfig \(trl [\d.]+\) "
                                   r"\(nearest: top_entropy_quantile"),
    ({"top_entropy_quantile": "high"}, "'top_entropy_quantile': 'high' is not a float"),
])
def test_bad_extra_is_one_line_naming_the_field(extra, message):
    from rlmeta.settings import ConfigError, parse

    with pytest.raises(ConfigError, match=message) as e:
        parse(RLJob, {"algorithm": "grpo", "rewards": {"xml_strict": 1.0}, "train": {"trl": {"extra": extra}}})
    assert "\n" not in str(e.value) and "train.trl.extra" in str(e.value)


def test_lora_config():
    assert T.lora_config(None) is None
    lc = T.lora_config(LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]))
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, set(lc.target_modules), lc.task_type) == (4, 8, 0.1, {"q_proj"},
                                                                                             "CAUSAL_LM")


def test_reward_functions_are_named_and_read_reference():
    fns = T.reward_functions(RLJob.model_validate({"rewards": {"gsm8k_correct": 1.0, "integer_answer": 0.5}}))
    assert [f.__name__ for f in fns] == ["gsm8k_correct", "integer_answer"]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    completions = [[{"role": "assistant", "content": "<reasoning>\nx\n</reasoning>\n<answer>\n42\n</answer>"}],
                   [{"role": "assistant", "content": "<answer>\nseven\n</answer>"}]]
    assert fns[0](prompts=prompts, completions=completions, reference=["42", "7"], trainer_state=None) == [1.0, 0.0]
    assert fns[1](prompts=prompts, completions=completions, reference=["42", "7"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RLJob.model_validate({"rewards": {"nope": 1.0}})


def test_reward_functions_pass_reward_params_and_prompts():
    calls = []

    def echo(completion, reference=None, prompt=None, scale: float = 1.0):
        calls.append((completion, reference, prompt))
        return scale * len(completion)

    with registered("toy_len", echo):
        (fn,) = T.reward_functions(RLJob.model_validate({"rewards": {"toy_len": 2.0},
                                                         "reward_params": {"toy_len": {"scale": 0.5}}}))
        assert fn(prompts=["p", "q"], completions=["abcd", "ab"], completion_ids=[[1], [2]]) == [2.0, 1.0]
    assert fn.__name__ == "toy_len" and calls == [("abcd", None, "p"), ("ab", None, "q")]


def test_train_dataset_is_the_train_split(tmp_path):
    rows = [dict(prompt_id=f"p{i}", experiment="e", item_id=f"i{i}", task="t", split=("train", "eval")[i % 2],
                 prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}],
                 reference=str(i), reference_completion=None) for i in range(6)]
    write_table(tmp_path / "p.parquet", pa.Table.from_pylist(rows, schema=PROMPTS))
    ds = T.train_dataset(tmp_path / "p.parquet")
    assert ds.column_names == ["prompt", "reference", "prompt_index", "prompt_id"]
    assert ds["reference"] == ["0", "2", "4"] and ds["prompt_id"] == ["p0", "p2", "p4"]  # ids: the rollouts table's
    assert ds["prompt_index"] == [0, 1, 2]  # UED's index of each train prompt
    assert ds[1]["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"}]
    assert len(T.train_dataset(tmp_path / "p.parquet", max_prompts=2)) == 2


def test_metrics_callback_rows_carry_forward_and_nan_stop(tmp_path, capsys):
    import torch

    from rlmeta.tracking import DivergenceGuard, NonFiniteMetricError

    metrics = MetricsTable(["reward/toy_a"])
    guard = DivergenceGuard(RLGuardSettings(), 0.0)
    cb = T.TrainMetricsCallback(metrics, ["toy_a"], guard)
    state = SimpleNamespace(global_step=1, max_steps=3, is_world_process_zero=True)
    gen = {"reward": 0.5, "reward_std": 0.1, "num_tokens": 120.0, "frac_reward_zero_std": 0.25,
           "completions/mean_length": 7.0, "rewards/toy_a/mean": 0.5, "clip_ratio/region_mean": 0.0}
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
        model.bias.copy_(torch.tensor([4.0, 0.0]))
    cb.on_step_begin(None, state, None)
    cb.on_step_end(None, state, None, model=model)  # the weights' norm after the step: sqrt(1 + 4 + 4 + 16) = 5
    cb.on_log(None, state, None, logs={"loss": 0.1, "grad_norm": 0.3, "learning_rate": 1e-3, **gen})
    checkpoint = tmp_path / "ck" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    guard.record_checkpoint(1, checkpoint)  # as Trainer._save_checkpoint does
    state.global_step = 2  # a reuse step (num_iterations > 1): TRL logs no sampling metrics
    cb.on_log(None, state, None, logs={"loss": 0.2, "grad_norm": 0.4, "learning_rate": 1e-3})
    cb.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": 0.1})  # end-of-training summary
    rows = metrics.table().to_pylist()
    # rows are kept in memory; the trainer writes the table when it ends
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["reward_mean"] == 0.5 and rows[1]["tokens"] == 120
    assert rows[0]["zero_std_frac"] == 0.25 and rows[0]["reward/toy_a"] == 0.5 and rows[0]["kl"] is None
    assert rows[0]["param_norm"] == pytest.approx(5.0) and guard.start_norm == pytest.approx(5.0)
    assert rows[0]["step_seconds"] >= 0 and "step 2/3 loss=0.2" in capsys.readouterr().err
    state.global_step = 3
    with pytest.raises(NonFiniteMetricError, match=r"^non-finite loss at step 3: loss=nan; last good checkpoint: "
                                                   rf"{re.escape(str(checkpoint))}$"):
        cb.on_log(None, state, None, logs={"loss": float("nan"), "grad_norm": 0.4, "learning_rate": 1e-3})
    assert metrics.table().num_rows == 3  # the bad row is kept for diagnosis


def test_metrics_callback_runs_the_divergence_conditions():
    """The guard sees every logged row: a zero gradient with rewards that still differ, three steps running."""
    from rlmeta.tracking import DivergenceError, DivergenceGuard

    cb = T.TrainMetricsCallback(MetricsTable(["reward/toy_a"]), ["toy_a"],
                                DivergenceGuard(RLGuardSettings(), 0.0))
    state = SimpleNamespace(global_step=0, max_steps=9, is_world_process_zero=True)
    gen = {"reward": 0.5, "reward_std": 0.1, "num_tokens": 120.0, "frac_reward_zero_std": 0.25}
    for step, grad in [(1, 0.3), (2, 0.0), (3, 0.0)]:
        state.global_step = step
        cb.on_log(None, state, None, logs={"loss": 0.1, "grad_norm": grad, "learning_rate": 1e-3, **gen})
    state.global_step = 4
    with pytest.raises(DivergenceError, match=r"^diverged at step 4: the gradient norm stayed at 0 .* for 3 steps "
                                              r"\(since step 2; train\.guard\.zero_grad_norm\)"):
        cb.on_log(None, state, None, logs={"loss": 0.1, "grad_norm": 0.0, "learning_rate": 1e-3, **gen})


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
    final, _ = trained_pos
    cfg = json.loads((final / "config.json").read_text())
    base_cfg = json.loads((tiny[1] / "config.json").read_text())
    assert cfg["use_cache"] is True and cfg.get("pad_token_id") == base_cfg.get("pad_token_id")
    assert cfg["rope_theta"] == 10000.0 and cfg["dtype"] == "float32"
    assert_opens_in_transformers_and_mlx(final, [{"role": "user", "content": "write cats 0"}])


# (d) train_metrics and W&B ---------------------------------------------------------------------------

@pytest.mark.slow
def test_train_metrics_columns_and_finite(trained_pos):
    _, out = trained_pos
    t = pq.read_table(out / "train_metrics.parquet")
    assert t.column_names == [n for n, _ in TRAIN_METRICS_BASE] + ["reward/toy_a"]
    rows = t.to_pylist()
    assert [r["step"] for r in rows] == list(range(1, PROOF_TRAIN["steps"] + 1))
    for col in ("loss", "reward_mean", "reward_std", "clip_ratio", "grad_norm", "lr", "tokens", "step_seconds",
                "zero_std_frac", "completion_len_mean", "param_norm", "reward/toy_a"):
        vals = [r[col] for r in rows]
        assert all(v is not None and math.isfinite(v) for v in vals), (col, vals)
    assert all(r["kl"] is None for r in rows)  # beta = 0: TRL computes no KL
    assert rows[0]["lr"] == pytest.approx(3e-2)
    assert all(a < b for a, b in zip([r["tokens"] for r in rows], [r["tokens"] for r in rows][1:]))
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]
    assert rows[-1]["reward/toy_a"] == pytest.approx(rows[-1]["reward_mean"])
    # the default divergence guard (every condition on) watched this learning run and tripped nothing
    assert job_of().train.guard == RLGuardSettings(patience=3, zero_grad_norm=0.0, param_norm_ratio=10.0,
                                                   reward_floor=True)
    assert all(r["param_norm"] < 10 * rows[0]["param_norm"] for r in rows)


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
def test_gspo_lora_cli_two_steps_and_resume(tiny, toy_reward, capfd):
    import torch
    from safetensors.torch import load_file

    root, model, prompts = tiny
    job = {"algorithm": "gspo", "rewards": {"toy_a": 1.0},
           "train": {**PROOF_TRAIN, "steps": 2, "checkpoint_every": 1, "learning_rate": 1e-2,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                     "trl": {"report_to": "none"}}}
    out = root / "gspo"
    ck, metrics = out / "checkpoints", out / "train_metrics.parquet"
    argv = ["train-trl", "--model", str(model), "--prompts", str(prompts), "--job", json.dumps(job),
            "--out", str(ck), "--metrics", str(metrics), "--seed", "1",
            "--wandb", json.dumps({"mode": "disabled", "project": "rlmeta-test"})]

    def cli(args) -> tuple[int, str]:
        """Exit status and stderr (progress lines and the log: the command line logs to stderr)."""
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            return main(args), capfd.readouterr().err
        finally:  # main() sets up logging afresh; give pytest its handlers back
            root.handlers[:] = handlers
            root.setLevel(level)

    progress = re.compile(r"step \d+/2 ")
    status, err = cli(argv)
    assert status == 0 and "step 1/2" in err and "resuming" not in err
    args = torch.load(ck / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert (args.importance_sampling_level, args.epsilon, args.epsilon_high) == ("sequence", 3e-4, 4e-4)
    merged, base = load_file(ck / "final" / "model.safetensors"), load_file(model / "model.safetensors")
    assert set(merged) == set(base), "LoRA weights left in the final checkpoint"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q]) and torch.equal(merged["model.embed_tokens.weight"],
                                                                base["model.embed_tokens.weight"])
    assert steps_of(metrics) == [1, 2]
    # whole checkpoints: a marker naming the step and the spec, and the metrics rows so far
    assert [s for s, _ in checkpoints.numbered(ck)] == [1, 2]
    assert not [p.name for p in ck.iterdir() if p.name.startswith(".")], "staging folders left behind"
    for step in (1, 2):
        marker = checkpoints.marker(ck / f"checkpoint-{step}")
        assert marker["step"] == step and marker["spec"]["job"] == RLJob.model_validate(job).model_dump(mode="json")
        assert steps_of(ck / f"checkpoint-{step}" / METRICS_FILE) == list(range(1, step + 1))
    first_rows = pq.read_table(metrics).to_pylist()
    first = (ck / "final" / "model.safetensors").read_bytes()

    shutil.rmtree(ck / "checkpoint-2")  # as if killed after step 1: resume trains step 2
    metrics.unlink()  # a killed run leaves no train_metrics.parquet: checkpoint-1 carries step 1's row
    status, err = cli(argv)
    assert status == 0 and f"resuming {ck / 'checkpoint-1'}" in err
    assert progress.findall(err) == ["step 2/2 "]
    assert steps_of(metrics) == [1, 2]
    resumed_rows = pq.read_table(metrics).to_pylist()
    assert resumed_rows[0] == first_rows[0]  # restored from checkpoint-1, not trained again
    assert drop_seconds(resumed_rows) == drop_seconds(first_rows)
    assert (ck / "final" / "model.safetensors").read_bytes() == first  # same seed, same result

    status, err = cli(argv)  # finished: the final policy is rebuilt from checkpoint-2, nothing trained
    assert status == 0 and f"resuming {ck / 'checkpoint-2'}" in err and not progress.findall(err)
    assert steps_of(metrics) == [1, 2]
    assert (ck / "final" / "model.safetensors").read_bytes() == first

    job["train"]["learning_rate"] = 5e-3  # a changed spec must not resume from the old checkpoints
    status, err = cli([*argv[:6], json.dumps(job), *argv[7:]])
    assert status == 0 and "resuming" not in err and "trained with a different spec" in err
    assert progress.findall(err) == ["step 1/2 ", "step 2/2 "]


# (f) an incomplete checkpoint is skipped ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_step_run(tiny, toy_reward):
    """A full fine-tuning run of 2 steps with a checkpoint after each (the reference of the resume tests)."""
    final, out = train(tiny, "two_steps", 1.0, steps=2, checkpoint_every=1)
    return out, pq.read_table(out / "train_metrics.parquet").to_pylist(), (final / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["copy_without_marker", "truncated_weights"])
def test_incomplete_checkpoint_is_skipped_with_a_warning(tiny, toy_reward, two_step_run, tmp_path, caplog, capfd,
                                                         damage):
    ref_out, ref_rows, ref_final = two_step_run
    _, model, prompts = tiny
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints" / "checkpoint-1", out / "checkpoints" / "checkpoint-1")
    fake = out / "checkpoints" / "checkpoint-2"  # the newest checkpoint under the next step's name, cut short
    shutil.copytree(ref_out / "checkpoints" / "checkpoint-1", fake)
    (fake / checkpoints.MARKER).unlink()
    if damage == "truncated_weights":
        weights = fake / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    caplog.set_level(logging.INFO)
    T.train_trl(model, prompts, job_of(1.0, steps=2, checkpoint_every=1), out / "checkpoints",
                out / "train_metrics.parquet", WandbSettings(mode="disabled"), seed=0)
    assert f"skipping checkpoint {fake}: incomplete" in caplog.text
    assert f"resuming {out / 'checkpoints' / 'checkpoint-1'}" in caplog.text
    err = capfd.readouterr().err
    assert "step 2/2" in err and "step 1/2" not in err
    assert steps_of(out / "train_metrics.parquet") == [1, 2]
    assert drop_seconds(pq.read_table(out / "train_metrics.parquet").to_pylist()) == drop_seconds(ref_rows)
    assert (out / "checkpoints" / "final" / "model.safetensors").read_bytes() == ref_final
    assert checkpoints.is_complete(fake) and checkpoints.marker(fake)["step"] == 2  # written again, whole


# (g) UED: prompts drawn by learning potential through UEDRepeatSampler ------------------------------------

UED_TRAIN = {"steps": 3, "batch_prompts": 4, "group_size": 4, "updates_per_batch": 2, "checkpoint_every": 1,
             "ued": {"enabled": True, "staleness_weight": 0.3}}


def ued_run(tiny, out: Path, monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Train with UED; the (pending batch, per-completion prompt indices) of every feedback TRL gave."""
    _, model, prompts = tiny
    fed = []
    feedback = T.UEDRepeatSampler.feedback

    def recording(self, indices, totals):
        fed.append((list(self.pending[0]), [int(i) for i in indices]))
        return feedback(self, indices, totals)

    monkeypatch.setattr(T.UEDRepeatSampler, "feedback", recording)
    T.train_trl(model, prompts, job_of(1.0, **UED_TRAIN), out / "checkpoints", out / "train_metrics.parquet",
                WandbSettings(mode="disabled"), seed=0)
    monkeypatch.setattr(T.UEDRepeatSampler, "feedback", feedback)
    return fed


@pytest.mark.slow
def test_ued_trl_draws_distinct_prompts_scores_them_and_resumes_exactly(tiny, toy_reward, tmp_path, monkeypatch,
                                                                        caplog):
    a = tmp_path / "a"
    fed = ued_run(tiny, a, monkeypatch)
    g = UED_TRAIN["group_size"]
    assert len(fed) == UED_TRAIN["steps"]  # one rollout per batch; the updates_per_batch reuses give no rewards
    for batch, indices in fed:
        assert len(set(batch)) == UED_TRAIN["batch_prompts"]  # distinct prompts
        assert sorted(indices) == sorted(i for i in batch for _ in range(g))  # each prompt's whole group
    assert len({i for b, _ in fed for i in b}) > UED_TRAIN["batch_prompts"]  # unseen prompts rank first

    ck = a / "checkpoints"
    assert [s for s, _ in checkpoints.numbered(ck)] == [2, 4, 6]  # every rollout batch = 2 optimizer steps
    state = json.loads((ck / "checkpoint-6" / T.UED_FILE).read_text())
    scored = {i for i, v in enumerate(state["ued"]["scores"]) if v is not None}
    assert scored == {i for b, _ in fed for i in b} and state["ued"]["step"] >= len(fed)
    assert all(0.0 <= state["ued"]["scores"][i] <= 0.5 for i in scored)  # potential of rewards in [0, 1]
    rows = pq.read_table(a / "train_metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    first = json.loads((ck / "checkpoint-2" / T.UED_FILE).read_text())  # after the first rollout batch
    assert {i for i, v in enumerate(first["ued"]["scores"]) if v is not None} == set(fed[0][0])
    # drawn ahead by the data loader, not scored yet: the next batch to train on (a resume replays it)
    assert first["pending"] == [fed[1][0]]

    # interrupted after the first rollout batch: only checkpoint-2 survives; resuming replays its pending draws
    b = tmp_path / "b"
    shutil.copytree(ck / "checkpoint-2", b / "checkpoints" / "checkpoint-2")
    caplog.set_level(logging.INFO)
    resumed = ued_run(tiny, b, monkeypatch)
    assert "resuming" in caplog.text
    assert [batch for batch, _ in resumed] == [batch for batch, _ in fed[1:]]  # the same draws as uninterrupted
    assert json.loads((b / "checkpoints" / "checkpoint-6" / T.UED_FILE).read_text()) == state
    assert drop_seconds(pq.read_table(b / "train_metrics.parquet").to_pylist()) == drop_seconds(rows)
    assert (b / "checkpoints" / "final" / "model.safetensors").read_bytes() == \
        (ck / "final" / "model.safetensors").read_bytes()


# (h) runs made to diverge: the divergence guard stops them ------------------------------------------------

GUARD_OFF = {"zero_grad_norm": None, "param_norm_ratio": None, "reward_floor": False}
DIVERGING = {
    # condition: (train settings, guard settings, the error's type, step it trips at, the step its condition began)
    # lr 1e4 (as measured in the issue): from step 2 the gradient is 0 although rewards still differ within groups
    "zero_grad": ({"learning_rate": 1e4}, {**GUARD_OFF, "zero_grad_norm": 0.0}, "DivergenceError", 4, 2,
                  r"the gradient norm stayed at 0 \(<= 0\) while the rewards still differed within groups for 3 steps"),
    # warm-up: step 1 runs at lr 0 (the start norm), step 2 at 1e4 grows the weights' norm ~1e5 times
    "param_norm": ({"learning_rate": 1e4, "warmup_steps": 1}, {**GUARD_OFF, "param_norm_ratio": 10.0},
                   "DivergenceError", 4, 2,
                   r"the weights' norm grew to \S+, \S+x its start \S+ \(limit 10x\) for 3 steps"),
    # three new tokens at lr 1: from step 3 every completion is the same text without an 'a' (reward 0, the floor).
    # zero_grad stays on: its gradient is 0 too, but every group's rewards are equal (no signal): it must not trip
    "reward_floor": ({"learning_rate": 1.0, "max_new_tokens": 3}, {**GUARD_OFF, "zero_grad_norm": 0.0,
                                                                   "reward_floor": True},
                     "DivergenceError", 5, 3, r"the mean rollout reward fell to its floor 0 after having been above it "
                                              r"for 3 steps"),
    # the default guard; step 2 at lr 1e30 leaves huge but finite weights (param_norm starts to hold), step 3's
    # overflow them: the checkpoint written after step 2 is not called good
    "non_finite": ({"learning_rate": 1e30, "warmup_steps": 1, "weight_decay": 0.1}, {}, "NonFiniteMetricError", 3, 2,
                   r"non-finite \S.*"),
}


@pytest.mark.slow
@pytest.mark.parametrize("condition", list(DIVERGING))
def test_a_run_made_to_diverge_trips_the_guard(tiny, toy_reward, tmp_path, condition):
    """The error names the step, the condition, its settings key and the last checkpoint written before the
    condition began to hold, whose weights are finite; nothing is written as final."""
    from rlmeta import tracking

    train_over, guard, error, trip, began, says = DIVERGING[condition]
    _, model, prompts = tiny
    ck, metrics = tmp_path / "checkpoints", tmp_path / "train_metrics.parquet"
    job = job_of(1.0, steps=6, checkpoint_every=1, guard=guard, **train_over)
    with pytest.raises(tracking.DivergenceError) as e:
        T.train_trl(model, prompts, job, ck, metrics, WandbSettings(mode="disabled"), seed=0)
    assert type(e.value).__name__ == error
    named = ck / f"checkpoint-{began - 1}"
    msg = str(e.value)
    if condition == "non_finite":
        assert re.fullmatch(rf"non-finite \S.* at step {trip}: .*; last good checkpoint: {re.escape(str(named))}",
                            msg), msg
    else:
        key = f"train.guard.{tracking.DivergenceGuard.KEYS[condition]}"
        assert re.fullmatch(rf"diverged at step {trip}: {says} \(since step {began}; {re.escape(key)}\); "
                            rf"last good checkpoint: {re.escape(str(named))}", msg), msg
    assert [s for s, _ in checkpoints.numbered(ck)] == list(range(1, trip))  # checked before the step's save
    assert not (ck / "final").exists() and not metrics.exists()
    assert checkpoints.weights_finite(named) is True
    rows = pq.read_table(ck / f"checkpoint-{trip - 1}" / METRICS_FILE).to_pylist()
    good, bad = rows[:began - 1], rows[began - 1:]
    if condition == "zero_grad":
        assert all(r["grad_norm"] > 0 for r in good) and all(r["grad_norm"] == 0 and r["zero_std_frac"] < 1
                                                             for r in bad), rows
    elif condition == "param_norm":
        assert good[0]["lr"] == 0 and all(r["param_norm"] > 1e4 * good[0]["param_norm"] for r in bad), rows
    elif condition == "reward_floor":
        assert all(r["reward_mean"] > 0 for r in good) and all(r["reward_mean"] == 0 for r in bad), rows
        assert all(r["grad_norm"] == 0 and r["zero_std_frac"] == 1 for r in bad), rows  # not a zero_grad trip
    else:  # huge but finite at step 2
        assert bad[0]["lr"] == pytest.approx(1e30) and math.isfinite(bad[0]["param_norm"])
        assert bad[0]["param_norm"] > 1e20 * good[0]["param_norm"]
