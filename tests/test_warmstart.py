"""Warm-start SFT on both backends: the loss falls, runs are seeded, checkpoints cross-load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlmeta.config import ROOT
from rlmeta.io import write_records
from rlmeta.models.build import build_tiny_model
from rlmeta.tables import PROMPTS
from rlmeta.warmstart import main as warmstart_main, sft_examples, warmstart

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SYSTEM = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
SFT = dict(steps=20, batch_size=4, learning_rate=1e-2, max_seq_len=192, seed=0)


def _data(*parts: str) -> Path:
    for base in (ROOT / "resources", SHARED):
        if (base.joinpath(*parts)).exists():
            return base.joinpath(*parts)
    pytest.skip(f"no {'/'.join(parts)} in resources/ or ../shared/data")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is small and shared; threads only contend
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ws_model_dir(tmp_path_factory) -> Path:
    corpus = [_data("rss"), _data("gsm8k", "test.jsonl"), _data("math", "test.jsonl")]
    build = {"tokenizer": "bpe", "vocab_size": 2048, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 256, "max_position_embeddings": 2048}
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
    return {b: warmstart(ws_model_dir, prompts_table, out / b, backend=b, **SFT) for b in ("torch", "mlx")}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_warmstart_lowers_loss_and_cross_loads(runs, backend):
    m = json.loads((runs[backend] / "warmstart_metrics.json").read_text())
    assert m["backend"] == backend and len(m["losses"]) == SFT["steps"]
    assert m["n_examples"] + m["n_skipped"] == 48
    assert m["final_loss"] < 0.7 * m["initial_loss"], m["losses"]
    assert _logit_gap(runs[backend]) < 1e-4  # reloads in transformers and mlx-lm alike


def test_backends_agree(runs):
    a, b = (json.loads((runs[k] / "warmstart_metrics.json").read_text())["losses"] for k in ("torch", "mlx"))
    assert abs(a[0] - b[0]) < 1e-3 and max(abs(x - y) for x, y in zip(a, b)) < 0.05


def test_seeded_and_zero_steps(ws_model_dir, prompts_table, tmp_path):
    kw = dict(SFT, steps=3)
    a = warmstart(ws_model_dir, prompts_table, tmp_path / "a", **kw)
    b = warmstart(ws_model_dir, prompts_table, tmp_path / "b", **kw)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    z = warmstart(ws_model_dir, prompts_table, tmp_path / "z", **dict(SFT, steps=0))
    for f in ws_model_dir.iterdir():
        assert (z / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((z / "warmstart_metrics.json").read_text())["losses"] == []


def test_warmstart_cli(ws_model_dir, prompts_table, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        warmstart_main(["--help"])
    assert e.value.code == 0 and "--max-seq-len" in capsys.readouterr().out
    warmstart_main(["--model", str(ws_model_dir), "--prompts", str(prompts_table), "--out", str(tmp_path / "c"),
                    "--steps", "1", "--batch-size", "2", "--lr", "1e-3", "--max-seq-len", "256", "--seed", "1",
                    "--backend", "mlx"])
    assert json.loads((tmp_path / "c" / "warmstart_metrics.json").read_text())["steps"] == 1
