"""Warm-start SFT on both backends: the loss falls, runs are seeded, checkpoints cross-load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlmeta import checkpoints
from rlmeta.cli import main
from rlmeta.io import write_records
from rlmeta.models.build import build_tiny_model
from rlmeta.settings import ROOT, ModelBuild, WarmstartSettings
from rlmeta.tables import PROMPTS
from rlmeta.warmstart import METRICS, sft_examples, warmstart

SYSTEM = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
SFT = WarmstartSettings(steps=20, batch_size=4, learning_rate=1e-2, max_seq_len=192)
SEED = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(*parts: str) -> Path:
    """A file of the bundled data in resources/ (tracked in git)."""
    path = ROOT.joinpath("resources", *parts)
    assert path.exists(), f"{path} missing from the checkout"
    return path


@pytest.fixture(scope="session")
def ws_model_dir(tmp_path_factory) -> Path:
    corpus = [_data("rss"), _data("gsm8k", "test.jsonl"), _data("math", "test.jsonl")]
    build = ModelBuild(tokenizer="bpe", vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, max_position_embeddings=2048)
    return build_tiny_model(tmp_path_factory.mktemp("ws_models") / "tiny", build, corpus, seed=1234)


@pytest.fixture(scope="session")
def prompts_table(tmp_path_factory) -> Path:
    """An xml_cot-like PROMPTS table: 48 GSM8K train rows with references, 8 eval, 4 without."""
    records = []
    with open(_data("gsm8k", "train.jsonl")) as fh:
        for i, line in zip(range(60), fh):
            row = json.loads(line)
            solution, answer = (s.strip() for s in row["answer"].split("####"))
            records.append(dict(
                prompt_id=f"p{i}", experiment="gsm8k_test", item_id=f"g{i}", task="gsm8k",
                split="eval" if 48 <= i < 56 else "train",
                prompt=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
                reference=answer,
                reference_completion=None if i >= 56 else
                f"<reasoning>\n{solution}\n</reasoning>\n<answer>\n{answer}\n</answer>",
            ))
    path = tmp_path_factory.mktemp("ws_tables") / "prompts.parquet"
    write_records(path, records, PROMPTS)
    return path


def _logit_gap(path: Path) -> float:
    import mlx.core as mx
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    ids = list(range(1, 64))
    with torch.no_grad():
        lt = AutoModelForCausalLM.from_pretrained(path).eval()(torch.tensor([ids])).logits[0].numpy()
    lm = np.array(mlx_lm.load(str(path))[0](mx.array([ids]))[0])
    return float(np.abs(lt - lm).max())


def test_sft_examples_mask_prompt(ws_model_dir, prompts_table):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ws_model_dir)
    examples, skipped = sft_examples(tok, prompts_table, 10_000)
    assert len(examples) == 48 and skipped == 0  # train rows with a reference completion only
    ids, n_prompt = examples[0]
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[n_prompt:]).startswith("<reasoning>\n") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    short, skipped = sft_examples(tok, prompts_table, 160)
    assert skipped > 0 and len(short) + skipped == 48 and all(n < len(i) <= 160 for i, n in short)


@pytest.fixture(scope="module")
def runs(ws_model_dir, prompts_table, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ws_runs")
    return {b: warmstart(ws_model_dir, prompts_table, out / b, SFT, SEED, backend=b) for b in ("torch", "mlx")}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_warmstart_lowers_loss_and_cross_loads(runs, backend):
    m = json.loads((runs[backend] / METRICS).read_text())
    assert m["backend"] == backend and len(m["losses"]) == SFT.steps and m["seed"] == SEED
    assert m["settings"] == SFT.model_dump()
    assert m["n_examples"] + m["n_skipped"] == 48
    assert m["final_loss"] < 0.7 * m["initial_loss"], m["losses"]
    assert _logit_gap(runs[backend]) < 1e-4  # reloads in transformers and mlx-lm alike
    # a complete portable checkpoint: rlmeta.checkpoints' marker (written last) lists every file
    assert checkpoints.is_complete(runs[backend])
    marker = checkpoints.marker(runs[backend])
    assert marker["kind"] == "warmstart" and marker["steps"] == SFT.steps
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            METRICS} <= set(marker["files"])
    assert "chat_template" in json.loads((runs[backend] / "tokenizer_config.json").read_text())


def test_backends_agree(runs):
    a, b = (json.loads((runs[k] / METRICS).read_text())["losses"] for k in ("torch", "mlx"))
    assert abs(a[0] - b[0]) < 1e-3 and max(abs(x - y) for x, y in zip(a, b)) < 0.05


def test_seeded_and_zero_steps(ws_model_dir, prompts_table, tmp_path):
    three = SFT.model_copy(update={"steps": 3})
    a = warmstart(ws_model_dir, prompts_table, tmp_path / "a", three, SEED)
    b = warmstart(ws_model_dir, prompts_table, tmp_path / "b", three, SEED)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    z = warmstart(ws_model_dir, prompts_table, tmp_path / "z", SFT.model_copy(update={"steps": 0}), SEED)
    for f in ws_model_dir.iterdir():  # steps 0: the model itself, copied unchanged
        assert (z / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((z / METRICS).read_text())["losses"] == []
    assert checkpoints.is_complete(z) and checkpoints.marker(z)["steps"] == 0
    assert {p.name for p in z.iterdir()} == {p.name for p in ws_model_dir.iterdir()} | {METRICS, checkpoints.MARKER}


def test_warmstart_cli(ws_model_dir, prompts_table, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["warmstart", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--settings" in out and "max_seq_len" in out
    settings = '{"steps": 1, "batch_size": 2, "learning_rate": 1e-3, "max_seq_len": 256}'
    assert main(["warmstart", "--model", str(ws_model_dir), "--prompts", str(prompts_table), "--out",
                 str(tmp_path / "c"), "--settings", settings, "--seed", "1", "--backend", "mlx"]) == 0
    m = json.loads((tmp_path / "c" / METRICS).read_text())
    assert m["settings"]["steps"] == 1 and m["settings"]["max_seq_len"] == 256 and len(m["losses"]) == 1
    assert m["seed"] == 1 and m["backend"] == "mlx" and checkpoints.is_complete(tmp_path / "c")
