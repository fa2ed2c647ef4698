"""Tokenizers, tiny-model build (transformers <-> mlx-lm parity) and hub resolution."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlmeta.config import ROOT
from rlmeta.models.build import build_tiny_model, main as build_main
from rlmeta.models.hub import HubUnavailable, check_loadable, is_hub_id, load_model, resolve_model
from rlmeta.models.tokenizer import (
    TEMPLATE_STRINGS, corpus_texts, load_qwen_tokenizer, make_tokenizer, train_bpe_tokenizer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus_files() -> list[Path]:
    """Bundled data when present, else the shared copy; skip when neither exists."""
    for base in (ROOT / "resources", SHARED):
        files = [base / "rss", base / "gsm8k" / "test.jsonl", base / "math" / "test.jsonl"]
        if all(f.exists() for f in files):
            return files
    pytest.skip("no RSS/GSM8K/MATH corpus in resources/ or ../shared/data")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is small and shared; threads only contend
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    build = {"tokenizer": "bpe", "vocab_size": 2048, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 256, "max_position_embeddings": 2048}
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", build, corpus_files(), seed=1234)


def _logits_match(path: Path, ids: list[int]) -> float:
    import mlx.core as mx
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        lt = model(torch.tensor([ids])).logits[0].numpy()
    mm, _ = mlx_lm.load(str(path))
    lm = np.array(mm(mx.array([ids]))[0])
    assert lt.shape == lm.shape
    return float(np.abs(lt - lm).max())


def test_corpus_texts_extracts_fields_and_templates():
    texts = list(corpus_texts(corpus_files()))
    assert any("Trump" in t or "Guardian" in t for t in texts)  # RSS titles/summaries
    assert not any("<p>" in t for t in texts)  # HTML stripped from feed summaries
    assert any("\\boxed" in t for t in texts)  # MATH solutions
    assert set(TEMPLATE_STRINGS) <= set(texts)


def test_bpe_tokenizer_and_build_are_deterministic(tmp_path):
    rss = corpus_files()[0]
    a = build_tiny_model(tmp_path / "a", {"tokenizer": "bpe", "vocab_size": 512, "num_layers": 1}, [rss], seed=7)
    b = build_tiny_model(tmp_path / "b", {"tokenizer": "bpe", "vocab_size": 512, "num_layers": 1}, [rss], seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = train_bpe_tokenizer(corpus_texts([rss]), 512)
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads((a / "tokenizer.json").read_text())
    assert not list(tmp_path.glob(".*")), "atomic_dir left a temp folder"


def test_bpe_special_tokens_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == 2048
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    sample = "<reasoning>\nNatalia sold 48/2 = 24 clips in May. \\boxed{72}\n</reasoning>\n<answer>\n72\n</answer>"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample
    for s in ("<reasoning>", "<answer>", "Prediction:", "\\boxed{"):
        assert len(tok(s, add_special_tokens=False)["input_ids"]) <= 2, s


def test_qwen_tokenizer():
    tok = load_qwen_tokenizer()
    assert len(tok) == 151665
    assert tok("<|im_start|>hello<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 14990, 151645]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "You are Qwen, created by Alibaba Cloud." in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="corpus"):
        make_tokenizer({"tokenizer": "bpe"}, [])


def test_built_model_loads_in_transformers_and_mlx(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["vocab_size"] % 64 == 0 and cfg["tie_word_embeddings"] and cfg["head_dim"] == 16
    assert cfg["dtype"] == "float32" and cfg["eos_token_id"] == 2
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [0, 2] and gen["pad_token_id"] == 0
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tiny_model_dir.iterdir()}
    assert _logits_match(tiny_model_dir, list(range(1, 80))) < 1e-4


def test_qwen_vocab_model_loads_in_both(tmp_path):
    out = build_tiny_model(tmp_path / "tq", {"tokenizer": "qwen", "num_layers": 1}, [], seed=3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 151680 and cfg["eos_token_id"] == 151645 and cfg["bos_token_id"] == 151643
    assert _logits_match(out, [151644, 14990, 151645, 198, 100, 5000, 151000]) < 1e-4
    import mlx_lm

    _, tok = mlx_lm.load(str(out))
    assert tok.encode("<|im_start|>hello<|im_end|>", add_special_tokens=False) == [151644, 14990, 151645]
    assert 151645 in tok.eos_token_ids


def test_resolve_model():
    assert resolve_model({"build": {"tokenizer": "bpe"}}, "mlx", Path("results/models/tiny")) == "results/models/tiny"
    assert resolve_model({"hf": "Qwen/Qwen3-1.7B"}, "torch", None) == "Qwen/Qwen3-1.7B"
    assert resolve_model({"hf": "Qwen/Qwen3-1.7B"}, "mlx", None) == "Qwen/Qwen3-1.7B"
    assert resolve_model({"hf": "Qwen/Qwen3-1.7B", "mlx": "mlx-community/Qwen3-1.7B-bf16"}, "mlx") == "mlx-community/Qwen3-1.7B-bf16"
    with pytest.raises(ValueError, match="built_dir"):
        resolve_model({"build": {"tokenizer": "bpe"}}, "torch", None)
    assert is_hub_id("Qwen/Qwen3-1.7B") and not is_hub_id("./models/x") and not is_hub_id(str(ROOT))


@pytest.mark.parametrize("backend,key", [("torch", "hf"), ("mlx", "mlx")])
def test_hub_unreachable_message(monkeypatch, backend, key):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "rlmeta-test/no-such-model"
    expected = (f"cannot download {hub_id} from the Hugging Face hub (no network?): set models.qwen.{key} "
                f"to a local path, or pre-download with `huggingface-cli download {hub_id}`")
    with pytest.raises(HubUnavailable) as err:
        check_loadable(hub_id, backend, name="qwen")
    assert str(err.value) == expected
    with pytest.raises(HubUnavailable) as err:
        load_model(hub_id, backend, name="qwen")
    assert str(err.value) == expected
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_loadable(str(ROOT / "no-such-folder"), backend)


def test_build_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_main(["--help"])
    assert e.value.code == 0 and "--build-json" in capsys.readouterr().out
    build_main(["--build-json", '{"tokenizer": "bpe", "vocab_size": 400, "num_layers": 1}',
                "--corpus", str(corpus_files()[0] / "heise.atom"), "--seed", "1", "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "model.safetensors").exists()
