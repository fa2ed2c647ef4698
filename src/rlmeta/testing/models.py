"""Tiny models and tables for the tests and benchmarks: checkpoints, prompts tables, MATH task tables.

``tiny_checkpoint`` builds a Qwen3 with ``rlmeta.models.build.build_tiny_model`` and, unless
told not to, fine-tunes it for a few steps so that it answers short and ends with
``<|im_end|>`` (a random model almost never emits it), which gives both finish reasons.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from rlmeta.io import write_table
from rlmeta.settings import ROOT, ModelBuild
from rlmeta.tables import PROBLEMS, PROMPTS

GSM8K = ROOT / "resources" / "gsm8k" / "test.jsonl"


def questions(n: int, offset: int = 0) -> list[str]:
    """The first ``n`` GSM8K test questions after ``offset``."""
    with open(GSM8K) as fh:
        return [json.loads(line)["question"] for line in itertools.islice(fh, offset, offset + n)]


def messages(qs: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in qs]


@contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` torch threads (the test machine's cores are shared), then restore."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tiny_checkpoint(out_dir: Path, *, tokenizer: str = "bpe", hidden: int = 64, layers: int = 2, seed: int = 0,
                    teach_stop: bool = True, corpus_lines: int = 150) -> Path:
    """A tiny Qwen3 checkpoint folder (built with rlmeta.models.build)."""
    from rlmeta.models.build import build_tiny_model

    out_dir = Path(out_dir)
    corpus = out_dir.parent / f"{out_dir.name}-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions(corpus_lines)))
    build = ModelBuild(tokenizer=tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                       intermediate_size=4 * hidden)
    build_tiny_model(out_dir, build, [corpus], seed)
    if teach_stop:
        _teach_stop(out_dir, seed)
    return out_dir


def cached_checkpoint(pytest_config, name: str, **kw) -> Path:
    """``tiny_checkpoint`` kept in pytest's cache folder, keyed by the builder's source and ``kw``,
    so the test files and reruns share one build. Treat it as read-only."""
    from rlmeta.models import build

    src = Path(build.__file__).read_bytes() + Path(__file__).read_bytes() + repr(sorted(kw.items())).encode()
    cache = getattr(pytest_config, "cache", None)  # None under -p no:cacheprovider
    root = Path(cache.mkdir("rlmeta-policy-models")) if cache else Path(tempfile.gettempdir()) / "rlmeta-policy-models"
    path = root / f"{name}-{hashlib.sha256(src).hexdigest()[:12]}"
    if not (path / "config.json").exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tiny_checkpoint(tmp / "model", **kw)
        with contextlib.suppress(OSError):  # another process finished first
            os.replace(tmp / "model", path)
        shutil.rmtree(tmp, ignore_errors=True)
        for old in root.glob(f"{name}-" + "?" * 12):  # builds from older sources
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def _teach_stop(path: Path, seed: int, steps: int = 25) -> None:
    """A few SFT steps on 'The answer is N.<|im_end|>' so that samples often stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmeta.policy.torch_policy import pad_batch, sequence_logprobs

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qs = [" ".join(q.split()[:12]) for q in questions(16, offset=160)]
    prompts = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for m in messages(qs)]
    comps = [tok.encode(f"The answer is {i * 7 % 100}." + " so" * (i % 5) + "<|im_end|>", add_special_tokens=False)
             for i in range(len(qs))]
    batch = pad_batch(prompts, comps, tok.pad_token_id)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    with torch_threads(1):
        for _ in range(steps):
            lp = sequence_logprobs(model, *batch)
            loss = -(lp.sum() / batch[2].sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(path)


def prompts_table(n: int, split: str = "eval", offset: int = 0) -> pa.Table:
    """A PROMPTS table of ``n`` GSM8K questions."""
    rows = [{"prompt_id": f"p{offset + i:03d}", "experiment": "test", "item_id": f"gsm8k/{i}", "task": "gsm8k",
             "split": split, "prompt": m, "reference": None, "reference_completion": None}
            for i, m in enumerate(messages(questions(n, offset)))]
    return pa.Table.from_pylist(rows, schema=PROMPTS)


# -- MATH-like tasks for the meta-learning tests ----------------------------------------------

SUBJECTS = ["algebra", "geometry", "number_theory"]
TASKS_BUILD = ModelBuild(tokenizer="bpe", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_position_embeddings=512)


def _problem(subject: str, i: int, split: str) -> dict:
    a, b = i + 2, (i * 3) % 7 + 1
    op, ans = {"algebra": ("+", a + b), "geometry": ("*", a * b), "number_theory": ("-", a - b)}[subject]
    return dict(problem_id=f"{subject}/{split}/{i}", source="math", split=split, subject=subject, level=1,
                question=f"What is {a} {op} {b}?", solution=f"We get {a} {op} {b} = \\boxed{{{ans}}}.",
                answer=str(ans))


def make_tasks(root: Path, subjects=SUBJECTS, sizes=(6, 6, 6)) -> Path:
    """Write ``<root>/<subject>/{support,query,heldout}.parquet`` of one-line arithmetic problems."""
    for s_i, subject in enumerate(subjects):
        start = 10 * s_i
        for split, n in zip(("support", "query", "heldout"), sizes):
            rows = [_problem(subject, start + j, split) for j in range(n)]
            start += n
            write_table(root / subject / f"{split}.parquet", pa.Table.from_pylist(rows, schema=PROBLEMS), PROBLEMS)
    return root


def tasks_model(out: Path, seed: int = 0) -> Path:
    """A tiny Qwen3 (hidden 64, 2 layers, 300-token BPE) from ``build_tiny_model`` on the problems' text."""
    from rlmeta.models.build import build_tiny_model

    corpus = out.parent / f"{out.name}_corpus.jsonl"
    with open(corpus, "w") as fh:
        for s in SUBJECTS:
            for i in range(40):
                r = _problem(s, i, "x")
                fh.write(json.dumps({"problem": r["question"], "solution": r["solution"]}) + "\n")
    return build_tiny_model(out, TASKS_BUILD, [corpus], seed)


TINY_TRAINER_BUILD = ModelBuild(tokenizer="bpe", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                                num_kv_heads=1, intermediate_size=64)
"""The trainer tests' model: a BPE vocabulary of ~300 tokens and two 32-wide layers (a training step in ~0.1 s)."""


def build_trainer_model(folder: Path) -> Path:
    """``TINY_TRAINER_BUILD`` built into ``folder``/tiny (tokenizer trained on the bundled GSM8K sample, seed 0)."""
    from rlmeta.models.build import build_tiny_model

    return build_tiny_model(Path(folder) / "tiny", TINY_TRAINER_BUILD, [ROOT / "resources/gsm8k/train.jsonl"], 0)


def write_count_prompts(path: Path, n_train: int, n_eval: int) -> Path:
    """A prompts table of ``n_train`` train and ``n_eval`` eval prompts "count i i+1" (ids p0, p1, ...)."""
    rows = [{"prompt_id": f"p{i}", "experiment": "toy", "item_id": f"i{i}", "task": f"t{i}",
             "split": "train" if i < n_train else "eval", "prompt": [{"role": "user", "content": f"count {i} {i + 1}"}],
             "reference": None, "reference_completion": None} for i in range(n_train + n_eval)]
    write_table(path, pa.Table.from_pylist(rows, schema=PROMPTS))
    return path


def assert_opens_in_transformers_and_mlx(folder: Path, messages: list[dict]) -> None:
    """A checkpoint folder loads in transformers and (when installed) mlx-lm, with the same chat template ids and
    last-token logits within 1e-3 (the checkpoint format's promise)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in Path(folder).iterdir()}
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        pt = AutoModelForCausalLM.from_pretrained(folder)(torch.tensor([ids])).logits[0, -1].numpy()
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError:  # the MLX half is checked where mlx-lm is installed (the project's lock has it)
        return
    model, mtok = mlx_lm.load(str(folder))
    assert mtok.apply_chat_template(messages, add_generation_prompt=True) == ids
    mx_logits = np.array(model(mx.array([ids]))[0, -1])
    assert np.abs(mx_logits - pt[: mx_logits.shape[0]]).max() < 1e-3
    assert int(mx_logits.argmax()) == int(pt.argmax())


def toy_write_task(root: Path, words: list[str]) -> tuple[Path, Path]:
    """The TRL tests' toy task: a tiny Qwen3 (BPE vocab 300 -> 320 rows) in ``root/model`` and ``root/prompts.parquet``
    with ``4 x len(words)`` train prompts "write <word> <i>" and one eval prompt; returns (model, prompts)."""
    from rlmeta.models.build import build_tiny_model

    corpus = root / "corpus.jsonl"
    words_ = "the cat sat on a mat and ate some food while the dog ran in the park with 12 red balls".split()
    corpus.write_text("".join(json.dumps({"question": " ".join(words_[i % 7:] + words_[:i % 7]), "answer": str(i)})
                              + "\n" for i in range(200)))
    model = build_tiny_model(root / "model", ModelBuild(tokenizer="bpe", vocab_size=300), [corpus], seed=0)
    rows = [dict(prompt_id=f"p{i}", experiment="toy", item_id=f"i{i}", task="t", split=split,
                 prompt=[{"role": "user", "content": f"write {w} {i}"}], reference=str(i), reference_completion=None)
            for i, (w, split) in enumerate([(w, "train") for w in words * 4] + [("eval", "eval")])]
    write_table(root / "prompts.parquet", pa.Table.from_pylist(rows, schema=PROMPTS))
    return model, root / "prompts.parquet"
