"""Adaptation evaluation: base versus meta-learned initialisation on held-out problems."""
from __future__ import annotations

import json

import pytest

from rlmeta.cli import main
from rlmeta.meta.adaptation_eval import correctness, evaluate, split_heldout
from rlmeta.meta.fomaml import train
from rlmeta.settings import ROOT, MetaSettings, ModelBuild, WandbSettings
from rlmeta.testing.models import SUBJECTS, make_tasks, tasks_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

META = MetaSettings(outer_steps=4, meta_batch_size=2, inner_steps=2, inner_lr=0.05, outer_lr=0.01, support_batch=3,
                    query_batch=3, max_seq_len=128, checkpoint_every=100)
# Recommended embedded-default meta block (docs/meta-learning.md); the slow acceptance test uses it.
RECOMMENDED = MetaSettings(outer_steps=30, meta_batch_size=4, inner_steps=2, inner_lr=0.1, outer_lr=0.01,
                           support_batch=8, query_batch=8, max_seq_len=384, warmup_steps=2, lr_schedule="cosine",
                           max_grad_norm=1.0, checkpoint_every=10)
OFF = WandbSettings(mode="disabled")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    return {"model": tasks_model(root / "model"), "tasks": make_tasks(root / "tasks", sizes=(6, 6, 8)), "root": root}


def test_correctness_uses_math_verify():
    assert correctness([("so \\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("no box", "1")]) == [1.0, 0.0, 0.0]


def test_split_heldout():
    assert split_heldout(list(range(5))) == ([0, 1], [2, 3, 4])
    with pytest.raises(ValueError):
        split_heldout([1])


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_meta_init_adapts_better_than_base(env, tmp_path, lora):
    meta = MetaSettings.model_validate({**META.model_dump(), "lora": lora, "outer_lr": 0.05 if lora else 0.01})
    final = train(str(env["model"]), str(env["tasks"]), SUBJECTS, meta, 2, tmp_path / "ck/final",
                  tmp_path / "m.parquet", OFF)
    assert (final / "meta_adapter").exists() == bool(lora)
    out = tmp_path / "summary.json"
    assert main(["eval-adaptation", "--base", str(env["model"]), "--meta", str(final), "--tasks-dir", str(env["tasks"]),
                 "--subjects", *SUBJECTS, "--settings", meta.model_dump_json(), "--seed", "2", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    a = json.loads(out.read_text())["adaptation"]
    assert a["settings"] == {"inner_steps": 2, "inner_lr": 0.05, "support_batch": 3, "lora": lora is not None,
                             "max_new_tokens": 4, "seed": 2}
    assert set(a["per_subject"]) == set(SUBJECTS)
    keys = {"base_query_loss", "meta_query_loss", "base_accuracy", "meta_accuracy", "base_pre_adapt_loss",
            "meta_pre_adapt_loss"}
    assert all(keys <= set(v) for v in a["per_subject"].values())
    assert a["meta_init_query_loss"] < a["base_init_query_loss"]
    for v in a["per_subject"].values():
        assert 0.0 <= v["base_accuracy"] <= 1.0 and v["n_query"] == 4
        assert v["base_query_loss"] < v["base_pre_adapt_loss"]  # the inner loop adapts


def test_same_checkpoint_gives_same_numbers(env):
    """Base and meta the same folder: identical results (seeded support draw, exact restore)."""
    a = evaluate(str(env["model"]), str(env["model"]), str(env["tasks"]), SUBJECTS, META, 0, 2)["adaptation"]
    assert a["base_init_query_loss"] == a["meta_init_query_loss"]
    assert a["base_init_pre_adapt_loss"] == a["meta_init_pre_adapt_loss"]


@pytest.mark.slow
def test_embedded_default_acceptance(tmp_path):
    """Tiny default model + bundled MATH sample: the meta-learned init adapts to a lower query loss."""
    from rlmeta.data.math_problems import SLUGS, prepare_math, split_math_tasks
    from rlmeta.models.build import build_tiny_model

    res = ROOT / "resources"
    prepare_math(str(res / "math"), tmp_path / "math")
    split_math_tasks(tmp_path / "math/train.parquet", SLUGS, 0.30, 0.40, 1234, tmp_path / "tasks")
    corpus = [f for sub in ("rss", "gsm8k", "math") for f in sorted((res / sub).glob("*")) if f.is_file()]
    model = build_tiny_model(tmp_path / "tiny", ModelBuild(tokenizer="bpe"), corpus, 1234)  # the default build
    final = train(str(model), str(tmp_path / "tasks"), SLUGS, RECOMMENDED, 1234, tmp_path / "ck/final",
                  tmp_path / "m.parquet", OFF)
    a = evaluate(str(model), str(final), str(tmp_path / "tasks"), SLUGS, RECOMMENDED, 1234, 1)["adaptation"]
    assert a["meta_init_query_loss"] < a["base_init_query_loss"] - 0.5
