"""The inspect notebook, executed headlessly (nbclient, the venv's ipykernel), and the
inspect_model command line on both backends, using the tiny model the notebook builds."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import write_rl_metrics  # noqa: E402

from rlmeta.inspect import DEFAULT_REWARDS, load_prompts_file, main, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_model.ipynb"


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run with a missing checkpoint (so it builds the tiny model) and fixture metrics."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    tmp = tmp_path_factory.mktemp("nb")
    write_rl_metrics(tmp / "train_metrics.parquet", list(DEFAULT_REWARDS["xml_cot"]), steps=8)
    (tmp / "summary.json").write_text(json.dumps({"reward": {"base_mean": 0.25, "trained_mean": 0.5, "diff_mean": 0.25,
                                                             "diff_ci95": [0.1, 0.4], "n_prompts": 4}}))
    env = {"RLMETA_MODEL_DIR": str(tmp / "missing" / "final"), "RLMETA_FALLBACK_DIR": str(tmp),
           "RLMETA_METRICS": str(tmp / "train_metrics.parquet"), "RLMETA_SUMMARY": str(tmp / "summary.json"),
           "RLMETA_MAX_NEW_TOKENS": "16", "MPLBACKEND": "Agg"}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return nb, tmp / "tiny"


@pytest.mark.slow
def test_notebook_shows_completions_rewards_and_curves(executed):
    nb, tiny = executed
    assert (tiny / "model.safetensors").exists()
    text = _text(nb)
    assert "using the tiny random model" in text
    assert "--- sample 0 · reward" in text and "prompt 0: Natalia sold clips" in text
    for name in DEFAULT_REWARDS["xml_cot"]:
        assert name in text
    assert "reward base 0.250  trained 0.500" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the training curves were not displayed"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_cli_prints_completions_with_rewards(executed, backend, capsys):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    _, tiny = executed
    assert main(["--model", str(tiny), "--backend", backend, "--prompt", "What is 2 + 3?", "--prompt", "And 4 + 4?",
                 "--reference", "5", "--samples", "2", "--max-new-tokens", "8", "--seed", "3",
                 "--rewards-json", '{"xml_soft": 1.0, "gsm8k_correct": 2.0}']) == 0
    out = capsys.readouterr().out
    assert "xml_soft" in out and "gsm8k_correct" in out and "weights: xml_soft=1, gsm8k_correct=2" in out
    assert out.count("--- sample") == 4 and "prompt 1: And 4 + 4?" in out and "reference: 5" in out


def test_render_and_prompts_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "What is 1+1?", "answer": "2"}\n"Just a string?"\nplain text line\n')
    rows = load_prompts_file(f)
    rendered = render(rows, "math_boxed")
    assert [ref for _, ref in rendered] == ["2", None, None]
    assert rendered[0][0][-1]["content"] == "What is 1+1?" and "\\boxed" in rendered[0][0][0]["content"]
    assert rendered[2][0][-1]["content"] == "plain text line"
    msgs, ref = render([{"prompt": [{"role": "user", "content": "hi"}], "reference": None}], "xml_cot")[0]
    assert msgs == [{"role": "user", "content": "hi"}] and ref is None
    (head,) = render(["Rain in Berlin"], "inner_scientist")
    assert "Headline: Rain in Berlin" in head[0][-1]["content"]
