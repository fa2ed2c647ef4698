"""Tokenizers, tiny-model build (transformers <-> mlx-lm parity), local paths versus hub ids and
clear errors when the hub cannot be reached."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from rlmeta.cli import main
from rlmeta.errors import UserError
from rlmeta.models.build import build_tiny_model
from rlmeta.models.hub import HUB_TIMEOUT_S, HubUnavailable, check_hub_access, classify_source, is_hub_id
from rlmeta.models.tokenizer import (
    TEMPLATE_STRINGS,
    corpus_texts,
    load_qwen_tokenizer,
    make_tokenizer,
    train_bpe_tokenizer,
)
from rlmeta.settings import ROOT, ModelBuild

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def corpus_files() -> list[Path]:
    """The corpus bundled in resources/ (RSS feeds, GSM8K and MATH test files; tracked in git)."""
    base = ROOT / "resources"
    files = [base / "rss", base / "gsm8k" / "test.jsonl", base / "math" / "test.jsonl"]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"bundled corpus missing: {missing}"
    return files


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    build = ModelBuild(tokenizer="bpe", vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, max_position_embeddings=2048)
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
    build = ModelBuild(tokenizer="bpe", vocab_size=512, num_layers=1)
    a = build_tiny_model(tmp_path / "a", build, [rss], seed=7)
    b = build_tiny_model(tmp_path / "b", build, [rss], seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = train_bpe_tokenizer(corpus_texts([rss]), 512)
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads((a / "tokenizer.json").read_text())
    assert not list(tmp_path.glob(".*")), "atomic_dir left a temp folder"


def test_bpe_special_tokens_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == 2048
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
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
    with pytest.raises(UserError, match="corpus"):
        make_tokenizer(ModelBuild(tokenizer="bpe"), [])


def test_built_model_loads_in_transformers_and_mlx(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["vocab_size"] % 64 == 0 and cfg["tie_word_embeddings"] and cfg["head_dim"] == 16
    assert cfg["dtype"] == "float32" and cfg["eos_token_id"] == 2
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [0, 2] and gen["pad_token_id"] == 0
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert _logits_match(tiny_model_dir, list(range(1, 80))) < 1e-4


def test_qwen_vocab_model_loads_in_both(tmp_path):
    out = build_tiny_model(tmp_path / "tq", ModelBuild(tokenizer="qwen", num_layers=1), [], seed=3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 151680 and cfg["eos_token_id"] == 151645 and cfg["bos_token_id"] == 151643
    assert _logits_match(out, [151644, 14990, 151645, 198, 100, 5000, 151000]) < 1e-4
    import mlx_lm

    _, tok = mlx_lm.load(str(out))
    assert tok.encode("<|im_start|>hello<|im_end|>", add_special_tokens=False) == [151644, 14990, 151645]
    assert 151645 in tok.eos_token_ids


def test_is_hub_id():
    assert is_hub_id("Qwen/Qwen3-1.7B") and is_hub_id("openai/gsm8k")
    assert not is_hub_id("./models/x") and not is_hub_id("/abs/path") and not is_hub_id(str(ROOT))
    assert not is_hub_id("resources/gsm8k")  # an existing folder is never a hub id
    assert not is_hub_id("Qwen3-1.7B")  # no owner


def test_classify_source():
    key = "datasets.gsm8k.source"
    assert classify_source("openai/gsm8k", key, ROOT) == "hub"
    assert classify_source("resources/gsm8k", key, ROOT) == "local"
    assert classify_source(str(ROOT / "resources" / "gsm8k"), key, "/") == "local"
    with pytest.raises(UserError) as err:  # owner/name shape, but resources/ is a local folder: a typo
        classify_source("resources/gsm8k_typo", key, ROOT)
    msg = str(err.value)
    assert msg.startswith(f"{key}: resources/gsm8k_typo does not exist") and "\n" not in msg, msg
    assert "'resources' is a local folder" in msg and "gsm8k" in msg.split("holds:")[1], msg  # lists what is there
    with pytest.raises(UserError, match=r"^models\.tiny\.hf: \./no-such-folder does not exist"):
        classify_source("./no-such-folder", "models.tiny.hf", ROOT)


@pytest.mark.parametrize("offline_env", [False, True])
@pytest.mark.parametrize("repo_type", ["model", "dataset"])
def test_check_hub_access_offline(monkeypatch, offline_env, repo_type):
    """This machine has no network: an uncached repository fails fast, in one line naming the key."""
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo, key = "rlmeta-test/no-such-repo", "models.qwen.hf"
    t0 = time.perf_counter()
    with pytest.raises(HubUnavailable) as err:
        check_hub_access(repo, key, repo_type)
    elapsed = time.perf_counter() - t0
    assert elapsed < HUB_TIMEOUT_S + 5, elapsed
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith(f"{key}: ") and repo in msg and "check_hub: false" in msg, msg
    if offline_env:
        assert "HF_HUB_OFFLINE is set" in msg and f"hf download {repo}" in msg, msg
        assert ("--repo-type dataset" in msg) == (repo_type == "dataset"), msg
    else:
        assert "cannot download" in msg or "is not on the Hugging Face hub" in msg, msg


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_load_policy_hub_unreachable_message(monkeypatch, backend):
    """Opening an uncached hub model offline ends in one HubUnavailable line that says what to do."""
    import huggingface_hub.constants

    from rlmeta.policy import load_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "rlmeta-test/no-such-model"
    expected = (f"model: cannot download {hub_id} from the Hugging Face hub (no network?): use a local path, or "
                f"pre-download it with `hf download {hub_id}` where there is a network")
    with pytest.raises(HubUnavailable) as err:
        load_policy(hub_id, backend)
    assert str(err.value) == expected
    with pytest.raises(Exception) as err:  # a missing local folder is not a hub problem: its error is left alone
        load_policy(str(ROOT / "no-such-folder"), backend)
    assert not isinstance(err.value, HubUnavailable)


def test_build_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build-model", "--help"])
    assert e.value.code == 0 and "--build" in capsys.readouterr().out
    build = '{"tokenizer": "bpe", "vocab_size": 400, "num_layers": 1}'
    assert main(["build-model", "--build", build, "--corpus", str(corpus_files()[0] / "heise.atom"), "--seed", "1",
                 "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == 448  # 400 padded to a multiple of 64
    with pytest.raises(SystemExit) as e:  # a bad block is an argparse error naming the key
        main(["build-model", "--build", '{"tokenizer": "bpe", "vocab_sise": 400}', "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "vocab_sise" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
