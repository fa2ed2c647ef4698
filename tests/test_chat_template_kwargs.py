"""``train.chat_template_kwargs`` (Qwen3's ``enable_thinking: false``) reach every place that renders an RL
prompt: both policies, the warm start, TRL's GRPOConfig, the evaluation (null = training's), the evaluations
during training and ``rlmeta inspect``; bad keys and values are one line naming the key."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from rlmeta.policy import load_policy
from rlmeta.policy.base import encode_prompts
from rlmeta.testing.models import cached_checkpoint, messages, prompts_table, questions

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QWEN3_TEMPLATE = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"
THINK = "<think>\n\n</think>\n\n"
OFF = {"enable_thinking": False}
EXP = {"dataset": "gsm8k", "prompt": "xml_cot", "model": "tiny", "backend": "torch", "algorithm": "grpo",
       "rewards": {"xml_strict": 1.0}}


class Recorded(Exception):
    """Raised by a spied ``generate`` once it has the prompt ids."""


def spy(policy, seen: list):
    """``policy.generate`` recording the prompts it is given, then stopping the caller."""
    def generate(prompts, *a, **kw):
        seen.extend([list(p) for p in prompts])
        raise Recorded
    policy.generate = generate
    return policy


@pytest.fixture(scope="module")
def qwen3_model(pytestconfig, tmp_path_factory) -> Path:
    """The tiny checkpoint with a Qwen3-style chat template (the bundled Qwen2.5 one ignores enable_thinking)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3_template") / "tiny"
    shutil.copytree(cached_checkpoint(pytestconfig, "tiny"), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = QWEN3_TEMPLATE.read_text()
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(qwen3_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_model)


@pytest.fixture(scope="module")
def msgs():
    return messages([" ".join(q.split()[:10]) for q in questions(3)])


@pytest.fixture(scope="module")
def think_ids(tok) -> list[int]:
    return tok.encode(THINK, add_special_tokens=False)


def test_the_template_appends_the_think_block_only_when_thinking_is_off(tok, msgs, think_ids):
    plain = tok.apply_chat_template(msgs[0], tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(msgs[0], tokenize=False, add_generation_prompt=True, **OFF)
    assert plain.endswith("<|im_start|>assistant\n") and off == plain + THINK
    assert len(think_ids) >= 2 and tok.decode(think_ids) == THINK


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_policy_prompt_ids_end_with_the_think_block_on_both_backends(qwen3_model, msgs, think_ids, backend):
    plain = load_policy(qwen3_model, backend)
    off = load_policy(qwen3_model, backend, chat_template_kwargs=OFF)
    assert plain.chat_template_kwargs == {} and off.chat_template_kwargs == OFF
    without, with_ = plain.encode_prompts(msgs), off.encode_prompts(msgs)
    for a, b in zip(without, with_):
        assert b == a + think_ids  # the same prompt, then exactly the empty think block
        assert a[-len(think_ids):] != think_ids
    # generate given messages encodes them with the policy's kwargs too
    gens = off.generate(msgs[:1], n=1, temperature=0.0, max_new_tokens=1)
    assert gens[0].prompt_ids == with_[0]
    assert plain.generate(msgs[:1], n=1, temperature=0.0, max_new_tokens=1)[0].prompt_ids == without[0]


def test_mlx_and_torch_policies_encode_the_same_ids(qwen3_model, msgs, tok):
    ids = {b: load_policy(qwen3_model, b, chat_template_kwargs=OFF).encode_prompts(msgs) for b in ("mlx", "torch")}
    assert ids["mlx"] == ids["torch"] == encode_prompts(tok, msgs, OFF)


def _sft_table(path: Path, msgs) -> Path:
    from rlmeta.io import write_records
    from rlmeta.tables import PROMPTS

    records = [dict(prompt_id=f"p{i}", experiment="t", item_id=f"g{i}", task="gsm8k", split="train", prompt=m,
                    reference="42", reference_completion="<answer>\n42\n</answer>") for i, m in enumerate(msgs)]
    write_records(path, records, PROMPTS)
    return path


def test_warm_start_renders_the_prompts_training_does(qwen3_model, tok, msgs, tmp_path):
    from rlmeta.settings import WarmstartSettings
    from rlmeta.warmstart import METRICS, sft_examples, warmstart

    table = _sft_table(tmp_path / "prompts.parquet", msgs)
    rl_ids = load_policy(qwen3_model, "torch", chat_template_kwargs=OFF).encode_prompts(msgs)
    examples, _ = sft_examples(tok, table, 10_000, OFF)
    assert [ids[:n] for ids, n in examples] == rl_ids  # the prompt part is the RL prompt, think block included
    assert all(tok.decode(ids[:n]).endswith("<|im_start|>assistant\n" + THINK) for ids, n in examples)
    plain, _ = sft_examples(tok, table, 10_000)
    assert [ids[:n] for ids, n in plain] == load_policy(qwen3_model, "torch").encode_prompts(msgs)
    out = warmstart(qwen3_model, table, tmp_path / "ws", WarmstartSettings(steps=0), 0, chat_template_kwargs=OFF)
    assert json.loads((out / METRICS).read_text())["chat_template_kwargs"] == OFF


def test_trl_grpo_config_gets_the_kwargs(tmp_path):
    from rlmeta.rl import trl_trainer as T
    from rlmeta.rl.trl_fields import OWNED
    from rlmeta.settings import RLJob

    job = {"algorithm": "grpo", "rewards": {"xml_strict": 1.0}}
    kw = T.grpo_config_kwargs(RLJob.model_validate({**job, "train": {"chat_template_kwargs": OFF}}), tmp_path,
                              cuda=False, world=1)
    assert kw["chat_template_kwargs"] == {"enable_thinking": False}
    assert T.grpo_config_kwargs(RLJob.model_validate(job), tmp_path, cuda=False, world=1)["chat_template_kwargs"] == {}
    c = T.grpo_config(RLJob.model_validate({**job, "train": {"chat_template_kwargs": OFF,
                                                            "trl": {"report_to": "none"}}}), tmp_path)
    assert c.chat_template_kwargs == {"enable_thinking": False}
    assert OWNED["chat_template_kwargs"] == "train.chat_template_kwargs"


def test_eval_null_falls_back_to_training_and_an_explicit_value_wins():
    from rlmeta.settings import Experiment

    train = {"chat_template_kwargs": OFF}
    assert Experiment.model_validate({**EXP, "train": train}).sampling(seed=1).chat_template_kwargs == OFF
    assert Experiment.model_validate({**EXP, "train": train, "eval": {"chat_template_kwargs": {}}}).sampling(
        seed=1).chat_template_kwargs == {}
    on = {"enable_thinking": True}
    assert Experiment.model_validate({**EXP, "train": train, "eval": {"chat_template_kwargs": on}}).sampling(
        seed=1).chat_template_kwargs == on
    assert Experiment.model_validate(EXP).sampling(seed=1).chat_template_kwargs == {}
    fomaml = {**EXP, "algorithm": "fomaml", "dataset": "math", "prompt": "math_boxed"}
    fomaml.pop("rewards")
    assert Experiment.model_validate(fomaml).sampling(seed=1).chat_template_kwargs == {}  # meta: none


def test_rlmeta_generate_encodes_with_the_evaluations_kwargs(qwen3_model, msgs, think_ids):
    from rlmeta.rollout import generate_responses
    from rlmeta.settings import SamplingSettings

    table = prompts_table(2)
    want = encode_prompts(load_policy(qwen3_model, "torch").tokenizer, table.column("prompt").to_pylist(), OFF)
    seen: list = []
    with pytest.raises(Recorded):
        generate_responses(spy(load_policy(qwen3_model, "mlx"), seen), table,
                           SamplingSettings(chat_template_kwargs=OFF, samples=1))
    assert seen == want and all(ids[-len(think_ids):] == think_ids for ids in seen)


def test_evaluations_during_training_use_the_jobs_kwargs(qwen3_model, think_ids, tmp_path):
    from rlmeta.io import write_table
    from rlmeta.rl.evidence import EvalCurve
    from rlmeta.settings import RLJob
    from rlmeta.tables import PROMPTS

    path = tmp_path / "prompts.parquet"
    write_table(path, prompts_table(2), PROMPTS)
    job = RLJob.model_validate({"algorithm": "grpo", "rewards": {"xml_strict": 1.0},
                                "train": {"chat_template_kwargs": OFF, "eval_prompts": 2}})
    curve = EvalCurve(path, job, seed=0, last_step=1)
    seen: list = []
    with pytest.raises(Recorded):  # a policy built without kwargs (as TRL's callback builds it)
        curve.evaluate(spy(load_policy(qwen3_model, "torch"), seen), 0)
    assert len(seen) == 2 and all(ids[-len(think_ids):] == think_ids for ids in seen)


def test_inspect_takes_the_kwargs(qwen3_model, msgs, think_ids):
    from rlmeta.cli import chat_template_kwargs_type
    from rlmeta.inspect import inspect_model

    assert chat_template_kwargs_type('{"enable_thinking": false}') == OFF
    seen: list = []
    with pytest.raises(Recorded):
        inspect_model(spy(load_policy(qwen3_model, "mlx"), seen), "mlx", [(m, None) for m in msgs],
                      {"xml_strict": 1.0}, chat_template_kwargs=OFF)
    assert seen == encode_prompts(load_policy(qwen3_model, "mlx").tokenizer, msgs, OFF)
    assert all(ids[-len(think_ids):] == think_ids for ids in seen)
    with pytest.raises(argparse.ArgumentTypeError, match="enable_thinking"):
        chat_template_kwargs_type('{"enable_thinking": [1]}')


@pytest.mark.parametrize("block,kwargs,message", [
    ("train", {"enable-thinking": False}, r"config error: 'train\.chat_template_kwargs': key 'enable-thinking' "
                                          r"is not a keyword argument name; keys must be Python identifiers"),
    ("train", {"enable_thinking": [False]}, r"config error: 'train\.chat_template_kwargs': enable_thinking is "
                                            r"\[false\]; allowed values: true/false, a number, a string or null"),
    ("eval", {"enable_thinking": {"a": 1}}, r"config error: 'eval\.chat_template_kwargs': enable_thinking is "
                                            r"\{\"a\": 1\}; allowed values"),
    ("eval", {"1st": True}, r"'eval\.chat_template_kwargs': key '1st' is not a keyword argument name"),
])
def test_bad_key_or_value_is_one_line_naming_the_key(block, kwargs, message):
    from rlmeta.settings import ConfigError, Experiment, parse

    with pytest.raises(ConfigError, match=message) as e:
        parse(Experiment, {**EXP, block: {"chat_template_kwargs": kwargs}})
    assert "\n" not in str(e.value)


def test_scalars_and_null_are_allowed():
    from rlmeta.settings import TrainSettings

    kw = {"enable_thinking": False, "n": 2, "x": 0.5, "mode": "fast", "none": None}
    assert TrainSettings(chat_template_kwargs=kw).chat_template_kwargs == kw
