"""Open report.html in headless Chromium: every image decodes, the key numbers are on the page,
completions are shown as text (escaped), and a screenshot is taken.

Chromium comes from Debian (``apt-get install -y chromium``, installed by a session fixture when
missing); the tests skip with the reason when it cannot be installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlmeta.cli import main
from rlmeta.report.render import fmt
from rlmeta.settings import Experiment
from rlmeta.testing.fixtures import NASTY, evaluate_args, report_args, write_fomaml_fixture, write_rl_fixture

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `images ${ok}/${imgs.length}`;
  const d = document.createElement('pre');
  d.id = 'rlmeta-check';
  const warn = document.getElementById('reward-accuracy-warning');
  const lead = document.getElementById('lead');
  d.textContent = JSON.stringify({ok: ok, total: imgs.length, scripts: document.scripts.length,
    bold: document.querySelectorAll('td b, td script').length, text: document.body.innerText,
    warning: warn ? warn.innerText : null, warningTop: warn ? warn.getBoundingClientRect().top : null,
    leadTop: lead ? lead.getBoundingClientRect().top : null, lead: lead ? lead.innerText : null,
    sections: [...document.querySelectorAll('h2')].map(h => h.innerText)});
  document.body.appendChild(d);
});
</script></body>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium():
    """Path of a Chromium binary, installed with apt-get when missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    install = ["apt-get", *lock, "install", "-y", "--no-install-recommends", "chromium"]
    for cmd in (["apt-get", *lock, "update"], install):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(cmd)} timed out")
        if out.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {out.stderr.strip()[-300:]}")
    exe = shutil.which("chromium")
    if not exe:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return exe


def run_chromium(exe: str, page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000", *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def make_report(res: Path, exp: str, kind: str) -> tuple[Path, dict]:
    d = res / exp
    if kind == "fomaml":
        cfg = write_fomaml_fixture(res, exp)["config"]
        args = []
    else:
        fx = write_rl_fixture(res, exp, "xml_cot", n_prompts=8, samples=2, gaming=kind == "gaming")
        raw = fx["config"].model_dump(mode="json")
        cfg = Experiment.model_validate({**raw, "eval": {**raw["eval"], "bootstrap": 200}})
        assert main(["evaluate", "--experiment", exp, "--config", cfg.model_dump_json(),
                     *evaluate_args(d, fx["runs"]), "--out", str(d / "eval/summary.json")]) == 0
        args = report_args(d, fx["runs"])
    if kind == "fomaml":
        args = ["--metrics", str(d / "train_metrics.parquet")]
    assert main(["report", "--experiment", exp, "--config", cfg.model_dump_json(), "--summary",
                 str(d / "eval/summary.json"), *args, "--out-dir", str(d / "report")]) == 0
    return d / "report" / "report.html", json.loads((d / "eval/summary.json").read_text())


def checked_dom(exe: str, page: Path, tmp: Path) -> dict:
    probe = tmp / f"probe_{page.parent.parent.name}.html"
    probe.write_text(page.read_text().replace("</body>", CHECK))
    out = run_chromium(exe, probe, tmp, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'<pre id="rlmeta-check">(.*?)</pre>', out.stdout, re.DOTALL)
    assert m, f"the check script did not run; stderr: {out.stderr[-1000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.mark.chromium
@pytest.mark.parametrize("kind", ["xml_cot", "gaming", "fomaml"])
def test_report_renders_in_chromium(chromium, tmp_path, kind):
    page, summary = make_report(tmp_path / "results", f"exp_{kind}", kind)
    check = checked_dom(chromium, page, tmp_path)
    assert check["total"] >= 2 and check["ok"] == check["total"], check
    assert check["scripts"] == 1 and check["bold"] == 0  # only the probe's script; completions are text
    text = check["text"]
    if kind == "fomaml":
        ad = summary["adaptation"]
        assert fmt(ad["base_init_query_loss"], 4) in text and fmt(ad["meta_init_query_loss"], 4) in text
    else:
        r = summary["reward"]
        for x in (fmt(r["base_mean"]), fmt(r["trained_mean"]), fmt(r["diff_mean"], signed=True)):
            assert x in text
        assert NASTY in text  # shown literally, not interpreted
        # the task accuracy leads, the reward follows; then the evidence from training
        assert check["lead"].startswith("Accuracy gsm8k_xml") and "Total reward" in check["lead"], check["lead"]
        assert check["leadTop"] < 400
        assert {"Evaluation during training", "Training rollouts: best and worst completion of a group"} <= set(
            check["sections"]), check["sections"]
        if kind == "gaming":  # reward up, accuracy down: a warning box above the lead
            assert check["warning"] and "the policy learned the reward, not the task" in check["warning"]
            assert check["warningTop"] < check["leadTop"]
        else:
            assert check["warning"] is None
    shot = tmp_path / f"screenshot_{kind}.png"
    out = run_chromium(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1300,2600")
    assert out.returncode == 0 and shot.stat().st_size > 10_000, out.stderr[-2000:]
    if os.environ.get("RLMETA_SCREENSHOT_DIR"):  # keep it for a person to look at
        shutil.copy(shot, Path(os.environ["RLMETA_SCREENSHOT_DIR"]) / shot.name)
