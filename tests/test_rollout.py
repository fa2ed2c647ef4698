"""Rollouts into a RESPONSES table: schema, order, determinism, one-batch reruns, the CLI."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rlmeta.cli import main
from rlmeta.io import write_table
from rlmeta.policy import load_policy
from rlmeta.rollout import batch_seed, generate_responses
from rlmeta.settings import ROOT, SamplingSettings
from rlmeta.tables import PROMPTS, RESPONSES
from rlmeta.testing.models import cached_checkpoint, prompts_table

KW = dict(split="eval", samples=3, temperature=0.9, top_p=1.0, max_new_tokens=8, seed=5, batch_size=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sampling(**kw) -> SamplingSettings:
    return SamplingSettings(**{**KW, **kw})


@pytest.fixture(scope="module")
def ckpt(pytestconfig):
    return cached_checkpoint(pytestconfig, "tiny")


@pytest.fixture(scope="module")
def table():
    import pyarrow as pa

    return pa.concat_tables([prompts_table(5, "eval"), prompts_table(2, "train", offset=5)])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_responses_schema_order_and_determinism(ckpt, table, backend):
    policy = load_policy(ckpt, backend)
    out = generate_responses(policy, table, sampling(max_prompts=4), policy_name="base")
    assert out.schema == RESPONSES
    rows = out.to_pylist()
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [(f"p{i:03d}", s) for i in range(4) for s in range(3)]
    assert {r["policy"] for r in rows} == {"base"}
    assert all(1 <= r["n_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert [r["seed"] for r in rows] == [batch_seed(5, i // 6) for i in range(12)]
    assert all(abs(r["temperature"] - 0.9) < 1e-6 for r in rows)
    assert generate_responses(policy, table, sampling(max_prompts=4), policy_name="base").equals(out)

    # Re-running only the second batch with its stored seed reproduces its rows.
    gens = policy.generate([m for m in table.column("prompt").to_pylist()[2:4]], 3, temperature=0.9,
                           max_new_tokens=8, seed=rows[6]["seed"])
    assert [g.text for g in gens] == [r["completion"] for r in rows[6:]]


def test_split_and_max_prompts(ckpt, table):
    policy = load_policy(ckpt, "mlx")
    out = generate_responses(policy, table, sampling(split="train", samples=1))
    assert out.column("prompt_id").to_pylist() == ["p005", "p006"]  # the train rows
    assert generate_responses(policy, table, sampling(max_prompts=None, samples=1)).num_rows == 5


def test_main_writes_parquet(ckpt, table, tmp_path):
    write_table(tmp_path / "prompts.parquet", table, PROMPTS)
    out = tmp_path / "responses.parquet"
    block = sampling(samples=2, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=3, batch_size=4, max_prompts=3)
    argv = ["generate", "--model", str(ckpt), "--backend", "torch", "--prompts", str(tmp_path / "prompts.parquet"),
            "--sampling", block.model_dump_json(), "--policy-name", "trained", "--out", str(out)]
    assert main(argv) == 0
    got = pq.read_table(out)
    assert got.schema.names == RESPONSES.names and got.num_rows == 6
    assert set(got.column("policy").to_pylist()) == {"trained"}
    assert got.column("prompt_id").to_pylist() == [f"p{i:03d}" for i in range(3) for _ in range(2)]
    assert set(got.column("seed").to_pylist()) == {batch_seed(3, 0)}  # the --sampling block was used
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_steps_help():
    for step in ("generate", "merge-lora"):
        res = subprocess.run([sys.executable, "-m", "rlmeta", step, "--help"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert res.returncode == 0 and "--model" in res.stdout


def test_generate_with_unreachable_hub_model_says_what_to_do(tmp_path):
    """A hub id with no network ends in one line that names the model and suggests a local path."""
    import os

    prompts = tmp_path / "prompts.parquet"
    pq.write_table(prompts_table(2), prompts)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "rlmeta", "generate", "--model", "Qwen/Qwen3-1.7B",
                          "--backend", "torch", "--prompts", str(prompts), "--out", str(tmp_path / "r.parquet")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rlmeta generate: error: model: ") and "Traceback" not in out.stderr, out.stderr
    assert "cannot download Qwen/Qwen3-1.7B" in last and "local path" in last, last
    assert not (tmp_path / "r.parquet").exists()
