"""Summary across experiments: ``results/summary.parquet`` (one row per experiment with its
headline numbers) and a self-contained ``results/summary.html`` linking each report."""
from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path

import pyarrow as pa
from pydantic import RootModel

from rlmeta.prompts import TEMPLATES
from rlmeta.report import plots
from rlmeta.report.render import CSS, _img, fmt
from rlmeta.settings import Experiment

log = logging.getLogger(__name__)
ACCURACIES = tuple(dict.fromkeys(c.split("/", 1)[1] for t in TEMPLATES.values() for c in t.metrics
                                 if c.startswith("accuracy/")))
"""Every accuracy some template reports (one pair of columns each)."""

SUMMARY = pa.schema(
    [pa.field("experiment", pa.string(), nullable=False)]
    + [pa.field(n, pa.string()) for n in ("algorithm", "backend", "model", "dataset", "template")]
    + [pa.field("steps", pa.int64()), pa.field("n_prompts", pa.int64()), pa.field("seeds", pa.int64())]
    + [pa.field(n, pa.float64())
       for n in ("reward_base", "reward_trained", "reward_diff", "reward_diff_low", "reward_diff_high",
                 "reward_seeds_low", "reward_seeds_high")]
    + [pa.field("accuracy_metric", pa.string()), pa.field("accuracy_base", pa.float64()),
       pa.field("accuracy_trained", pa.float64())]
    + [pa.field(n, pa.float64()) for n in ("accuracy_diff", "accuracy_diff_low", "accuracy_diff_high",
                                           "accuracy_seeds_low", "accuracy_seeds_high")]
    + [pa.field("pass_k", pa.int64())]
    + [pa.field(n, pa.float64()) for n in ("pass_base", "pass_trained", "maj_base", "maj_trained")]
    + [pa.field(f"{a}_{p}", pa.float64()) for a in ACCURACIES for p in ("base", "trained")]
    + [pa.field(n, pa.float64()) for n in ("base_init_query_loss", "meta_init_query_loss", "train_seconds")]
    + [pa.field("report", pa.string())]
)
"""Columns of summary.parquet (null where an experiment has no such number)."""


class ExperimentSet(RootModel[dict[str, Experiment]]):
    """Experiment name -> its validated config block (what ``rlmeta summarize`` reads)."""


def _ci(c: dict | None) -> tuple:
    ci = (c or {}).get("diff_ci95") or [None, None]
    return ci[0], ci[1]


def _seeds_ci(summary: dict, q: str) -> tuple:
    a = summary.get("across_seeds", {}).get(q)
    return tuple(a["ci95"]) if a and a.get("ci95") else (None, None)


def summary_row(exp: str, cfg: Experiment, summary: dict, metrics=None) -> dict:
    """Headline numbers of one experiment (``metrics``: its train_metrics DataFrame, or a list of them, one per
    training seed; optional)."""
    row = {f.name: None for f in SUMMARY}
    row.update(experiment=exp, report=f"{exp}/report/report.html", algorithm=cfg.algorithm, backend=cfg.backend,
               model=cfg.model, dataset=cfg.dataset, template=cfg.prompt)
    row["steps"] = cfg.meta.outer_steps if cfg.meta is not None else cfg.train.steps
    tables = [m for m in (metrics if isinstance(metrics, list) else [metrics]) if m is not None and len(m)]
    if tables:
        row["steps"] = int(len(tables[0]))
        row["train_seconds"] = float(sum(m["step_seconds"].sum() for m in tables))
    if "reward" in summary:
        r = summary["reward"]
        row.update(n_prompts=r.get("n_prompts"), reward_base=r.get("base_mean"), reward_trained=r.get("trained_mean"),
                   reward_diff=r.get("diff_mean"))
        row["reward_diff_low"], row["reward_diff_high"] = _ci(r)
        row["reward_seeds_low"], row["reward_seeds_high"] = _seeds_ci(summary, "reward")
        row["seeds"] = len(summary.get("runs", {})) or 1
    acc = summary.get("accuracy", {})
    for name in ACCURACIES:
        if name in acc:
            row[f"{name}_base"], row[f"{name}_trained"] = acc[name].get("base"), acc[name].get("trained")
    primary = (TEMPLATES[cfg.prompt].primary_accuracy or "").removeprefix("accuracy/")
    if primary in acc:
        a = acc[primary]
        row.update(accuracy_metric=primary, accuracy_base=a["base"], accuracy_trained=a["trained"],
                   accuracy_diff=a.get("diff_mean"))
        row["accuracy_diff_low"], row["accuracy_diff_high"] = _ci(a)
        row["accuracy_seeds_low"], row["accuracy_seeds_high"] = _seeds_ci(summary, f"accuracy/{primary}")
        ks = sorted(summary.get("pass_at_k", {}).get(primary, {}), key=int)
        if ks:
            k = ks[-1]
            p, m = summary["pass_at_k"][primary][k], summary.get("maj_at_k", {}).get(primary, {}).get(k, {})
            row.update(pass_k=int(k), pass_base=p.get("base"), pass_trained=p.get("trained"), maj_base=m.get("base"),
                       maj_trained=m.get("trained"))
    ad = summary.get("adaptation")
    if ad:
        row.update(base_init_query_loss=ad.get("base_init_query_loss"),
                   meta_init_query_loss=ad.get("meta_init_query_loss"))
        accs = [v for v in ad.get("per_subject", {}).values() if v.get("base_accuracy") is not None]
        if accs:
            row.update(accuracy_metric="query accuracy (subject mean)",
                       accuracy_base=sum(v["base_accuracy"] for v in accs) / len(accs),
                       accuracy_trained=sum(v.get("meta_accuracy") or 0.0 for v in accs) / len(accs))
    return row


HEADLINE = [("experiment", "experiment"), ("algorithm", "algorithm"), ("backend", "backend"), ("model", "model"),
            ("steps", "steps"), ("seeds", "seeds"), ("accuracy_metric", "accuracy"),
            ("accuracy_base", "acc. base"), ("accuracy_trained", "acc. trained / meta"),
            ("accuracy_diff", "acc. difference"), ("accuracy_ci", "acc. 95% CI"), ("pass", "pass@k base → trained"),
            ("reward_base", "reward base"), ("reward_trained", "reward trained"), ("reward_diff", "reward difference"),
            ("ci", "reward 95% CI"), ("base_init_query_loss", "FOMAML base-init loss"),
            ("meta_init_query_loss", "FOMAML meta-init loss"), ("train_seconds", "training s")]
"""The summary table's columns, task accuracy first."""


def provenance_note(provenances: dict[str, dict | None]) -> str:
    """One sentence on what produced the results: the commit and versions they share, or which differ."""
    from rlmeta.report.render import KEY_PACKAGES

    def key(p):
        env = ((p or {}).get("training") or {}).get("environment") or (p or {}).get("environment") or {}
        git = env.get("git") or {}
        pk = env.get("packages", {})
        return (git.get("commit"), bool(git.get("dirty")), tuple((k, pk.get(k)) for k in KEY_PACKAGES if k in pk))

    keys = {exp: key(p) for exp, p in provenances.items()}
    if not keys:
        return ""
    distinct = sorted(set(keys.values()), key=str)
    if len(distinct) == 1:
        commit, dirty, pk = distinct[0]
        return (f"All results from commit {(commit or 'unknown')[:12]}{' (dirty tree)' if dirty else ''}; "
                + ", ".join(f"{k} {v}" for k, v in pk) + ".")
    groups = []
    for commit, dirty, pk in distinct:
        names = [e for e, k in keys.items() if k == (commit, dirty, pk)]
        groups.append(f"{', '.join(names)}: commit {(commit or 'unknown')[:12]}{' (dirty)' if dirty else ''}, "
                      + ", ".join(f"{k} {v}" for k, v in pk))
    return "Warning: these results come from different code or library versions. " + "; ".join(groups) + "."


def summary_html(rows: list[dict], image: Path | None, note: str = "") -> str:
    """The summary page: one table row per experiment (linked to its report) and the forest plot."""
    e = html.escape
    head = "".join(f"<th>{e(label)}</th>" for _, label in HEADLINE)
    body = []
    for r in rows:
        cells = []
        for key, _ in HEADLINE:
            if key == "experiment":
                cells.append(f"<td><a href='{e(r['report'])}'>{e(r['experiment'])}</a></td>")
            elif key in ("ci", "accuracy_ci"):
                what = "reward" if key == "ci" else "accuracy"
                low, high = r[f"{what}_diff_low"], r[f"{what}_diff_high"]
                ci = "—" if low is None else f"[{fmt(low, signed=True)}, {fmt(high, signed=True)}]"
                if r.get(f"{what}_seeds_low") is not None:
                    ci += (f"; seeds [{fmt(r[f'{what}_seeds_low'], signed=True)}, "
                           f"{fmt(r[f'{what}_seeds_high'], signed=True)}]")
                cells.append(f"<td class='num'>{e(ci)}</td>")
            elif key == "pass":
                txt = "—" if r.get("pass_k") is None else (
                    f"pass@{r['pass_k']} {fmt(r['pass_base'])} → {fmt(r['pass_trained'])}; "
                    f"maj@{r['pass_k']} {fmt(r['maj_base'])} → {fmt(r['maj_trained'])}")
                cells.append(f"<td class='num'>{e(txt)}</td>")
            else:
                v = r.get(key)
                digits = 1 if key == "train_seconds" else 4 if "loss" in key else 3
                if isinstance(v, float):
                    txt = fmt(v, digits, signed=key in ("reward_diff", "accuracy_diff"))
                else:
                    txt = "—" if v is None else str(v)
                cells.append(f"<td class='{'num' if isinstance(v, (int, float)) else 'txt'}'>{e(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    fig = _img(image, "reward difference per experiment") if image is not None else ""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<title>rlmeta: summary across experiments</title>"
            f"<style>{CSS}body{{max-width:1600px}}table{{font-size:.85em}}td{{white-space:nowrap}}</style></head>"
            "<body><h1>Summary across experiments</h1>"
            "<p>Task accuracy first (the template's primary accuracy, then pass@k and maj@k at the largest k), then "
            "the reward: mean per held-out prompt; difference = trained − base with a paired bootstrap 95% interval "
            "over prompts, and with several training seeds the t-interval across seeds ('seeds'). FOMAML rows: query "
            "loss after adaptation from the base and the meta-learned initialisation (lower is better). Each "
            "experiment links to its report.</p>"
            + (f"<p class='{'warn' if note.startswith('Warning') else 'meta'}' id='provenance'>{e(note)}</p>"
               if note else "")
            + f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{fig}</body></html>")


def command(p: argparse.ArgumentParser):
    """``rlmeta summarize``: every experiment's eval/summary.json (and train_metrics) into the summary files."""
    from rlmeta.cli import existing_dir, settings_type

    p.add_argument("--results", required=True, type=existing_dir,
                   help="results folder (reads <results>/<exp>/eval/summary.json)")
    p.add_argument("--experiments", required=True, type=settings_type(ExperimentSet, "experiments"),
                   help="experiment name -> config block, as JSON or a file")
    p.add_argument("--out-parquet", required=True)
    p.add_argument("--out-html", required=True)

    def run(a):
        from rlmeta.io import read_table, write_table, write_text

        res = Path(a.results)
        rows, provenances = [], {}
        for exp, cfg in a.experiments.root.items():
            summary = json.loads((res / exp / "eval" / "summary.json").read_text())
            provenances[exp] = summary.get("provenance")
            paths = ([res / exp / "train_metrics.parquet"] if cfg.algorithm == "fomaml" else
                     [res / exp / label / "train_metrics.parquet" for label in summary.get("runs", {})])
            metrics = [read_table(p).to_pandas() for p in paths if p.exists()]
            rows.append(summary_row(exp, cfg, summary, metrics))
        write_table(a.out_parquet, pa.Table.from_pylist(rows, schema=SUMMARY), SUMMARY)
        image = None
        if any(r["reward_diff"] is not None for r in rows):
            image = Path(a.out_html).with_name(".summary_forest.png")
            plots.experiments_forest(rows, image)
        try:
            write_text(a.out_html, summary_html(rows, image, provenance_note(provenances)))
        finally:
            if image is not None:
                image.unlink(missing_ok=True)
        log.info("summary of %d experiments -> %s, %s", len(rows), a.out_parquet, a.out_html)
    return run
