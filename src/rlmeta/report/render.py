"""One experiment's report: PNG figures plus ``report.md`` and a self-contained ``report.html``
(images embedded as base64 data URIs, every text HTML-escaped, no external resources).

``build_report`` draws the figures and returns a ``Report`` (key numbers, sections with
text, tables and images); ``to_markdown`` and ``to_html`` render it.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rlmeta.report import plots
from rlmeta.settings import Experiment

log = logging.getLogger(__name__)

RL_PLOTS = ("training_curves.png", "reward_distributions.png", "paired_differences.png")
FOMAML_PLOTS = ("meta_training.png", "adaptation.png")
"""The figure files each kind of experiment writes next to report.md (the rule's outputs)."""
MAX_CHARS = 1500
"""Completions longer than this are cut in the samples table."""


@dataclass
class Table:
    """A table; ``long`` marks long free text (completions), shown as blocks in Markdown."""

    columns: list[str]
    rows: list[list]
    long: bool = False


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, alt text)


@dataclass
class Report:
    title: str
    key_numbers: list[tuple[str, str]]
    sections: list[Section]
    meta: list[tuple[str, str]] = field(default_factory=list)


def fmt(x, digits: int = 3, signed: bool = False) -> str:
    """A number for the page ("n/a" for missing)."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_ci(ci) -> str:
    return f"[{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]" if ci else "n/a"


def _comparison_table(entries: dict, first: str, base_key="base_mean", trained_key="trained_mean",
                      weights=False) -> Table:
    cols = [first] + (["weight"] if weights else []) + ["base", "trained", "trained − base", "95% CI", "prompts"]
    rows = []
    for name, e in entries.items():
        rows.append([name] + ([fmt(e["weight"], 2) if "weight" in e else "—"] if weights else [])
                    + [fmt(e.get(base_key)), fmt(e.get(trained_key)), fmt(e.get("diff_mean"), signed=True),
                       fmt_ci(e.get("diff_ci95")), fmt(e.get("n_prompts"))])
    return Table(cols, rows)


def _cut(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" … [{len(text) - MAX_CHARS} more characters]"


def sample_table(prompts: pd.DataFrame, responses: dict[str, pd.DataFrame], rewards: dict[str, pd.DataFrame],
                 n: int = 6) -> Table:
    """Base and trained completion (first sample) with its reward on the first ``n`` shared prompts."""
    keyed = {p: responses[p].merge(rewards[p][["prompt_id", "sample_idx", "reward"]], on=["prompt_id", "sample_idx"])
             for p in responses}
    shared = set(keyed["base"]["prompt_id"]) & set(keyed["trained"]["prompt_id"])
    rows = []
    chosen = prompts[prompts["prompt_id"].isin(shared)].head(n)
    has_ref = bool(chosen["reference"].notna().any()) if "reference" in chosen else False
    for _, pr in chosen.iterrows():
        user = next((m["content"] for m in reversed(list(pr["prompt"])) if m["role"] == "user"), "")
        row = [_cut(user.split("\n\n")[0])]  # the question or headline, without the instructions
        if has_ref:
            row.append("—" if pd.isna(pr["reference"]) else str(pr["reference"]))
        for pol in ("base", "trained"):
            r = keyed[pol][keyed[pol]["prompt_id"] == pr["prompt_id"]].sort_values("sample_idx").iloc[0]
            row.append(f"reward {fmt(float(r['reward']))} · {int(r['n_tokens'])} tokens · {r['finish_reason']}\n\n"
                       + _cut(r["completion"]))
        rows.append(row)
    return Table(["prompt"] + ["reference"] * has_ref + ["base completion", "trained completion"], rows, long=True)


def _rl_report(exp: str, cfg: Experiment, s: dict, metrics: pd.DataFrame | None, out: Path, tables: dict | None,
               n_samples: int) -> Report:
    r = s["reward"]
    key = [
        ("Reward, base (mean per prompt)", fmt(r["base_mean"])),
        ("Reward, trained (mean per prompt)", fmt(r["trained_mean"])),
        ("Difference trained − base", f"{fmt(r['diff_mean'], signed=True)} (95% CI {fmt_ci(r['diff_ci95'])})"),
        ("Prompts × completions per policy", f"{r['n_prompts']} prompts, {r.get('n_samples')} completions"),
    ]
    for name, a in s.get("accuracy", {}).items():
        key.append((f"Accuracy {name}: base → trained", f"{fmt(a['base'])} → {fmt(a['trained'])}"))
    length = s["length"]
    key.append(("Completion length (tokens): base → trained",
                f"{fmt(length['base'], 1)} → {fmt(length['trained'], 1)}"))
    sections = []
    if metrics is not None and len(metrics):
        plots.training_curves(metrics, out / RL_PLOTS[0], f"{exp}: training curves")
        sections.append(Section("Training curves", [
            f"{len(metrics)} steps recorded, {fmt(float(metrics['step_seconds'].sum()), 1)} s of training in all. "
            "The shaded band is ± one standard deviation of the rollout rewards at each step."],
            images=[(RL_PLOTS[0], "training curves")]))
    comp = {"total reward": r, **s.get("components", {})}
    sec = Section("Base versus trained on the held-out prompts", [
        "Each prompt's completions are averaged per policy; the difference is trained − base per prompt, and "
        f"the 95% interval comes from {s['bootstrap']['resamples']} paired bootstrap resamples of the prompts "
        f"(seed {s['bootstrap']['seed']}). Components are unweighted; the total is the weighted sum."],
        tables=[_comparison_table(comp, "reward", weights=True)],
        images=[(RL_PLOTS[2], "paired differences")])
    plots.paired_differences(s, out / RL_PLOTS[2], f"{exp}: trained − base with 95% bootstrap intervals")
    if tables is not None:
        frames = {p: tables["rewards"][p] for p in ("base", "trained")}
        plots.reward_distributions(frames, list(s.get("components", {})), out / RL_PLOTS[1],
                                   f"{exp}: reward distributions")
        sec.images.insert(0, (RL_PLOTS[1], "reward distributions"))
    sections.append(sec)
    metrics_sec = Section("Task metrics", [
        "Accuracy uses the reference answer; format rates are shares of completions. "
        "'stopped' is the share that ended with a stop token rather than the length limit."])
    if s.get("accuracy"):
        metrics_sec.tables.append(_comparison_table(s["accuracy"], "accuracy", "base", "trained"))
    metrics_sec.tables.append(_comparison_table(s.get("format", {}), "format", "base", "trained"))
    metrics_sec.tables.append(_comparison_table({"completion length (tokens)": s["length"]}, "length", "base",
                                                "trained"))
    sections.append(metrics_sec)
    if s.get("per_subject"):
        rows = [[k, fmt(v.get("n_prompts")), fmt(v.get("reward_base")), fmt(v.get("reward_trained")),
                 fmt(v.get("accuracy_base")), fmt(v.get("accuracy_trained"))] for k, v in s["per_subject"].items()]
        sections.append(Section("Per subject", ["Mean over the completions of each MATH subject."], tables=[Table(
            ["subject", "prompts", "reward base", "reward trained", "accuracy base", "accuracy trained"], rows)]))
    if tables is not None:
        sections.append(Section("Sample completions on the same prompts", [
            f"The first sample of each policy on the first {n_samples} held-out prompts (texts are cut at "
            f"{MAX_CHARS} characters)."],
            tables=[sample_table(tables["prompts"], tables["responses"], tables["rewards"], n_samples)]))
    return Report(f"{exp}: {cfg.algorithm.upper()} report", key, sections)


def _fomaml_report(exp: str, cfg: Experiment, s: dict, metrics: pd.DataFrame | None, out: Path) -> Report:
    ad = s.get("adaptation", {})
    b, m = ad.get("base_init_query_loss"), ad.get("meta_init_query_loss")
    diff = None if b is None or m is None else m - b
    key = [("Query loss after adaptation, base init", fmt(b, 4)), ("Query loss after adaptation, meta init", fmt(m, 4)),
           ("Difference meta − base (negative: meta-learning helps)",
            fmt(diff, 4, signed=True) + (f" ({100 * diff / b:+.1f}%)" if diff is not None and b else ""))]
    sections = []
    if metrics is not None and len(metrics):
        plots.meta_training(metrics, out / FOMAML_PLOTS[0], f"{exp}: meta-training curves")
        sections.append(Section("Meta-training curves", [
            f"{len(metrics)} outer steps. meta/loss is the query loss after the inner adaptation steps; the "
            "adaptation gap is the query loss before minus after adaptation."],
            images=[(FOMAML_PLOTS[0], "meta-training curves")]))
    plots.adaptation_bars(s, out / FOMAML_PLOTS[1], f"{exp}: adaptation per subject")
    subj = ad.get("per_subject", {})
    cols = ["base_pre_adapt_loss", "meta_pre_adapt_loss", "base_query_loss", "meta_query_loss", "base_accuracy",
            "meta_accuracy"]
    rows = [[k] + [fmt(v.get(c), 4) for c in cols] for k, v in sorted(subj.items())]
    sections.append(Section("Adaptation per subject", [
        "Both initialisations are adapted on each held-out subject's support problems with the same inner steps; "
        "the query loss is measured after adaptation (pre-adapt: before)."],
        tables=[Table(["subject", "base pre-adapt loss", "meta pre-adapt loss", "base query loss", "meta query loss",
                       "base accuracy", "meta accuracy"], rows)], images=[(FOMAML_PLOTS[1], "adaptation per subject")]))
    return Report(f"{exp}: FOMAML report", key, sections)


def build_report(exp: str, cfg: Experiment, summary: dict, metrics: pd.DataFrame | None, out_dir: str | Path,
                 tables: dict | None = None) -> Report:
    """Draw the figures into ``out_dir`` and return the report of one experiment.

    ``tables`` (RL only): prompts, responses {base, trained} and rewards {base, trained} DataFrames.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.algorithm == "fomaml":
        rep = _fomaml_report(exp, cfg, summary, metrics, out)
    else:
        rep = _rl_report(exp, cfg, summary, metrics, out, tables, cfg.eval.report_samples)
    ck = summary.get("checkpoint") or {}
    rep.meta = [(k, str(v)) for k, v in [
        ("experiment", exp), ("algorithm", cfg.algorithm), ("backend", cfg.backend),
        ("model", cfg.model), ("dataset", cfg.dataset), ("template", cfg.prompt),
        ("checkpoint", ck.get("path")), ("checkpoint sha256", ck.get("sha256")),
        ("config sha256", summary.get("config_hash")), *provenance_lines(summary.get("provenance"))]
        if v is not None]
    return rep


KEY_PACKAGES = ("torch", "transformers", "trl", "peft", "mlx", "mlx-lm", "math-verify", "snakemake")
"""The versions a report's provenance lists (provenance.json has the whole stack)."""


def provenance_lines(prov: dict | None) -> list[tuple[str, str]]:
    """(label, value) lines of an experiment's provenance record for the report (empty when absent)."""
    if not prov:
        return []
    env = prov.get("environment", {})
    train_env = (prov.get("training") or {}).get("environment") or env
    git = env.get("git") or {}
    commit = git.get("commit")
    state = None if commit is None else f"{commit[:12]}" + (
        f" (dirty: diff sha256 {git.get('diff_sha256', '')[:12]})" if git.get("dirty") else " (clean)")
    pk = train_env.get("packages", {})
    gpu = (train_env.get("gpu") or {}).get("devices") or []
    jobs = prov.get("jobs", {})
    cpu = train_env.get("cpu", {})
    where = f"{train_env.get('hostname')}: {train_env.get('os')}, {cpu.get('model')} ({cpu.get('cores')} cores)"
    if gpu:
        where += f", {gpu[0]['name']} x{len(gpu)} (driver {gpu[0].get('driver')})"
    threads = {k: v for k, v in train_env.get("threads", {}).items() if k != "env"}
    seconds = sum(j["seconds"] for j in jobs.values())
    return [("git commit", state), ("Python", train_env.get("python")),
            ("packages", ", ".join(f"{k} {pk[k]}" for k in KEY_PACKAGES if k in pk) or None),
            ("trained on", where), ("threads", json.dumps(threads) if threads else None),
            ("seed", prov.get("seed")), ("input files hashed", len(prov.get("inputs", {}))),
            ("job wall time", f"{seconds:.1f} s over {len(jobs)} jobs" if jobs else None)]


def _fence(text: str) -> str:
    ticks = max([len(m) for m in re.findall(r"`+", text)] + [2]) + 1
    return f"{'`' * ticks}text\n{text}\n{'`' * ticks}"


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", "<br>")


def to_markdown(rep: Report) -> str:
    """Markdown with relative image links (the PNGs sit next to report.md)."""
    out = [f"# {rep.title}", "", "## Key numbers", ""]
    out += [f"- **{k}**: {v}" for k, v in rep.key_numbers] + [""]
    for sec in rep.sections:
        out += [f"## {sec.title}", ""] + [t + "\n" for t in sec.text]
        for fname, alt in sec.images:
            out += [f"![{alt}]({fname})", ""]
        for tb in sec.tables:
            if tb.long:
                for i, row in enumerate(tb.rows, 1):
                    out += [f"### Example {i}", ""]
                    for col, val in zip(tb.columns, row):
                        out += [f"**{col}**", "", _fence(str(val)), ""]
            else:
                out += ["| " + " | ".join(map(_md_cell, tb.columns)) + " |", "|" + "---|" * len(tb.columns)]
                out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in tb.rows] + [""]
    out += ["## Provenance", ""] + [f"- {k}: `{v}`" for k, v in rep.meta] + [""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{border-bottom:2px solid #1f77b4;padding-bottom:.3em}
.key{background:#f3f7fb;border:1px solid #c9d9ea;border-radius:6px;padding:.6em 1.2em}
.key dt{font-weight:600;float:left;clear:left;width:23em}.key dd{margin:0 0 .35em 24em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.88em}
table.long{width:100%;table-layout:fixed}table.long col.narrow{width:11%}table.long col.mid{width:20%}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.meta{color:#555;font-size:.85em}
.warn{background:#fff4e5;border:1px solid #f0a030;border-radius:6px;padding:.6em 1.2em}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def to_html(rep: Report, image_dir: str | Path) -> str:
    """Self-contained HTML: images from ``image_dir`` inlined as data URIs; all text escaped."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(rep.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(rep.title)}</h1>",
             "<section class='key' id='key-numbers'><h2>Key numbers</h2><dl>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in rep.key_numbers]
    parts.append("</dl></section>")
    for sec in rep.sections:
        sid = re.sub(r"[^a-z0-9]+", "-", sec.title.lower()).strip("-")
        parts.append(f"<section id='{sid}'><h2>{e(sec.title)}</h2>" + "".join(f"<p>{e(t)}</p>" for t in sec.text))
        for tb in sec.tables:
            narrow = "<col class='narrow'>" if "reference" in tb.columns else ""
            cols = (f"<colgroup><col class='mid'>{narrow}" + "<col>" * (len(tb.columns) - 1 - bool(narrow))
                    + "</colgroup>"
                    if tb.long else "")
            parts.append(f"<table class='{'long' if tb.long else 'short'}'>{cols}<thead><tr>"
                         + "".join(f"<th>{e(c)}</th>" for c in tb.columns) + "</tr></thead><tbody>")
            for row in tb.rows:
                cells = [f"<td><pre>{e(str(v))}</pre></td>" if tb.long else
                         f"<td class='num'>{e(str(v))}</td>" if i else f"<td>{e(str(v))}</td>"
                         for i, v in enumerate(row)]
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</tbody></table>")
        parts += [_img(Path(image_dir) / f, alt) for f, alt in sec.images]
        parts.append("</section>")
    parts.append("<section class='meta'><h2>Provenance</h2><ul>"
                 + "".join(f"<li>{e(k)}: <code>{e(v)}</code></li>" for k, v in rep.meta)
                 + "</ul></section></body></html>")
    return "\n".join(parts)


def _read(path) -> pd.DataFrame:
    from rlmeta.io import read_table

    return read_table(path).to_pandas()


def command(p: argparse.ArgumentParser):
    """``rlmeta report``: report.md, report.html and the figures of one experiment into --out-dir."""
    from rlmeta.cli import existing_file, settings_type
    from rlmeta.settings import Experiment

    p.add_argument("--experiment", required=True)
    p.add_argument("--config", required=True, type=settings_type(Experiment, "config"),
                   help="the experiment's config block (JSON or a file)")
    p.add_argument("--summary", required=True, type=existing_file, help="eval/summary.json")
    p.add_argument("--metrics", type=existing_file, help="train_metrics.parquet (training curves)")
    p.add_argument("--prompts", type=existing_file, help="prompts.parquet (RL: sample completions)")
    for pol in ("base", "trained"):
        p.add_argument(f"--responses-{pol}", type=existing_file, help=f"responses/{pol}.parquet (RL)")
        p.add_argument(f"--rewards-{pol}", type=existing_file, help=f"rewards/{pol}.parquet (RL)")
    p.add_argument("--out-dir", required=True, help="folder for report.md, report.html and the PNGs")

    def run(a):
        from rlmeta.io import write_text

        t0 = time.perf_counter()
        summary = json.loads(Path(a.summary).read_text())
        metrics = _read(a.metrics) if a.metrics else None
        tables = None
        if a.prompts and a.responses_base and a.responses_trained and a.rewards_base and a.rewards_trained:
            tables = {"prompts": _read(a.prompts),
                      "responses": {"base": _read(a.responses_base), "trained": _read(a.responses_trained)},
                      "rewards": {"base": _read(a.rewards_base), "trained": _read(a.rewards_trained)}}
        rep = build_report(a.experiment, a.config, summary, metrics, a.out_dir, tables)
        out = Path(a.out_dir)
        write_text(out / "report.md", to_markdown(rep))
        write_text(out / "report.html", to_html(rep, out))
        log.info("%s: report -> %s in %.1fs", a.experiment, out, time.perf_counter() - t0)
    return run
