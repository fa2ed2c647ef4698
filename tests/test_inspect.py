"""The inspect notebook, executed headlessly (nbclient, the venv's ipykernel), and the
``rlmeta inspect`` command line on both backends, using the tiny model the notebook builds."""
from __future__ import annotations

import json

import pytest

from rlmeta.cli import main
from rlmeta.inspect import load_prompts_file, render
from rlmeta.prompts import TEMPLATES
from rlmeta.settings import ROOT
from rlmeta.testing.fixtures import write_rl_metrics

NOTEBOOK = ROOT / "notebooks" / "inspect_model.ipynb"
XML_COT_REWARDS = TEMPLATES["xml_cot"].default_rewards


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
    write_rl_metrics(tmp / "train_metrics.parquet", list(XML_COT_REWARDS), steps=8)
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
    for name in XML_COT_REWARDS:
        assert name in text
    weights = ", ".join(f"{n}={w:g}" for n, w in XML_COT_REWARDS.items())
    assert f"weights: {weights}" in text  # the template's default rewards were used
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
    assert main(["inspect", "--model", str(tiny), "--backend", backend, "--prompt", "What is 2 + 3?",
                 "--prompt", "And 4 + 4?", "--reference", "5", "--samples", "2", "--max-new-tokens", "8",
                 "--seed", "3", "--rewards", '{"rewards": {"xml_soft": 1.0, "gsm8k_correct": 2.0}}']) == 0
    out = capsys.readouterr().out
    assert "xml_soft" in out and "gsm8k_correct" in out and "weights: xml_soft=1, gsm8k_correct=2" in out
    assert out.count("--- sample") == 4 and "prompt 1: And 4 + 4?" in out and "reference: 5" in out


@pytest.mark.slow
def test_cli_json_rows_and_reward_errors(executed, capsys):
    _, tiny = executed
    assert main(["inspect", "--model", str(tiny), "--prompt", "What is 2 + 3?", "--reference", "5", "--samples", "2",
                 "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt_index"], r["sample_idx"]) for r in rows] == [(0, 0), (0, 1)]
    for r in rows:  # the template's default rewards, weighted into the total
        assert set(XML_COT_REWARDS) <= set(r) and r["reference"] == "5"
        assert r["reward"] == pytest.approx(sum(w * r[n] for n, w in XML_COT_REWARDS.items()))
    with pytest.raises(SystemExit) as e:  # a misspelt reward is an argparse error naming it, before any loading
        main(["inspect", "--model", str(tiny), "--prompt", "hi", "--rewards", '{"rewards": {"xml_sft": 1}}'])
    assert e.value.code == 2 and "unknown reward 'xml_sft' (did you mean 'xml_soft'?)" in capsys.readouterr().err


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
