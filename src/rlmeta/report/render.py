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

RL_PLOTS = ("training_curves.png", "reward_distributions.png", "paired_differences.png", "seeds.png", "eval_curve.png")
FOMAML_PLOTS = ("meta_training.png", "adaptation.png", "adaptation_curve.png")
"""The figure files each kind of experiment writes next to report.md (the rule's outputs)."""
MAX_CHARS = 1500
"""Completions longer than this are cut in the samples table."""


@dataclass
class Table:
    """A table; ``long`` marks long free text (completions), shown in Markdown as one block per row, each
    headed ``<item> <n>``."""

    columns: list[str]
    rows: list[list]
    long: bool = False
    item: str = "Example"


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
    lead: list[str] = field(default_factory=list)  # the first lines: the task result, then the reward
    warnings: list[str] = field(default_factory=list)  # shown in a box above everything else


@dataclass
class Run:
    """One training run's tables (DataFrames; None where not given)."""

    metrics: pd.DataFrame | None = None
    curve: pd.DataFrame | None = None
    rollouts: pd.DataFrame | None = None


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
    """Base and trained completion (first sample) with its reward on the first ``n`` shared prompts
    (``responses``/``rewards``: ``base`` and ``trained``, the run shown)."""
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


def describe(c: dict | None, digits: int = 3) -> str:
    """'base 0.016 → trained 0.008, difference −0.008 (95% CI [−0.023, +0.008])' of a comparison."""
    if c is None:
        return "n/a"
    base, trained = c.get("base", c.get("base_mean")), c.get("trained", c.get("trained_mean"))
    return (f"base {fmt(base, digits)} → trained {fmt(trained, digits)}, difference "
            f"{fmt(c.get('diff_mean'), digits, signed=True)} (95% CI {fmt_ci(c.get('diff_ci95'))})")


def quantity_label(q: str) -> str:
    """'accuracy/gsm8k_xml' -> 'accuracy gsm8k_xml', 'pass@4/gsm8k_xml' -> 'pass@4 gsm8k_xml'."""
    return q.replace("/", " ", 1) if "/" in q else "total reward" if q == "reward" else q


def lead_lines(s: dict) -> list[str]:
    """The report's first lines: the primary accuracy (with pass@k and maj@k) and then the reward, each with
    its paired interval over prompts and, with several seeds, the spread across seeds."""
    from rlmeta.evaluation.evaluate import headline_quantities, lookup

    n_prompts = s["reward"].get("n_prompts")
    lines = []
    for q in headline_quantities(s):
        label = quantity_label(q)
        line = f"{label[:1].upper()}{label[1:]}: {describe(lookup(s, q))}"
        a = s.get("across_seeds", {}).get(q)
        if a is not None and a["n_seeds"] > 1:
            line += (f"; across {a['n_seeds']} seeds: mean {fmt(a['mean'], signed=True)} (95% t-interval "
                     f"{fmt_ci(a['ci95'])}), IQM {fmt(a['iqm'], signed=True)} ({fmt_ci(a['iqm_ci95'])})")
        lines.append(line)
    u = s.get("usual_answer")
    if u:  # the bar a policy that only learned the usual answer would clear
        lines.append(f"Always answering \"{u['answer']}\" (the best of the policies' most frequent answers) scores "
                     f"{u['metric'].removeprefix('accuracy/')} {fmt(u['accuracy'])}.")
    runs = len(s.get("runs", {})) or 1
    lines.append(f"Paired bootstrap over {n_prompts} held-out prompts"
                 + (f"; trained = the mean of {runs} training seeds per prompt." if runs > 1 else "."))
    return lines


def seeds_section(s: dict, out: Path, exp: str) -> Section:
    """Every seed's paired difference of the headline quantities, and their mean and IQM across seeds."""
    from rlmeta.evaluation.evaluate import headline_quantities, lookup

    quantities = headline_quantities(s)
    rows = []
    for label, block in s.get("runs", {}).items():
        rows.append([label] + [f"{fmt((lookup(block, q) or {}).get('diff_mean'), signed=True)} "
                               f"{fmt_ci((lookup(block, q) or {}).get('diff_ci95'))}" for q in quantities])
    across = s.get("across_seeds", {})
    for name, mid, ci in (("mean (t-interval)", "mean", "ci95"), ("IQM (bootstrap over seeds)", "iqm", "iqm_ci95")):
        rows.append([name] + [f"{fmt(across[q][mid], signed=True)} {fmt_ci(across[q][ci])}" if q in across else "n/a"
                              for q in quantities])
    plots.seeds_plot(s, out / RL_PLOTS[3], f"{exp}: trained − base per training seed")
    n = len(s.get("runs", {}))
    text = [f"{n} training seed(s), each evaluated against the same base responses. A row per seed: its paired "
            "difference over prompts (trained − base) with a 95% bootstrap interval over prompts. Across seeds: the "
            "mean with a t-interval and the interquartile mean with a percentile bootstrap over seeds (Agarwal et "
            "al. 2021; with fewer than 4 seeds the IQM equals the mean)."]
    if n < 2:
        text.append("With one seed nothing is known about the spread across training runs: set `seeds` in the "
                    "experiment for an interval across seeds.")
    return Section("Training seeds", text, tables=[Table(["run"] + [quantity_label(q) for q in quantities], rows)],
                   images=[(RL_PLOTS[3], "per-seed differences")])


def training_sections(exp: str, runs: dict[str, Run], out: Path, prompts: pd.DataFrame | None) -> list[Section]:
    """Training curves (first run), evaluation during training (every run) and a rollout excerpt (first run)."""
    from rlmeta.report.training import eval_curve_figure, rollout_excerpt

    sections = []
    first_label, first = next(iter(runs.items()))
    if first.metrics is not None and len(first.metrics):
        plots.training_curves(first.metrics, out / RL_PLOTS[0], f"{exp}: training curves ({first_label})")
        sections.append(Section("Training curves", [
            f"{first_label}: {len(first.metrics)} steps recorded, {fmt(float(first.metrics['step_seconds'].sum()), 1)} "
            "s of training in all. The shaded band is ± one standard deviation of the rollout rewards at each step."
            + (f" The other {len(runs) - 1} seed(s) have their own train_metrics.parquet." if len(runs) > 1 else "")],
            images=[(RL_PLOTS[0], "training curves")]))
    else:
        plots.training_curves(pd.DataFrame({"step": []}), out / RL_PLOTS[0], f"{exp}: no training metrics")
    curves = {label: r.curve for label, r in runs.items() if r.curve is not None}
    eval_curve_figure(curves, out / RL_PLOTS[4], f"{exp}: held-out evaluation during training")
    if any(len(c) for c in curves.values()):
        sections.append(Section("Evaluation during training", [
            "The policy on held-out prompts before training, every train.eval_every steps and after the last step "
            "(eval_curve.parquet of each seed): a run that collapses shows here while it trains."],
            images=[(RL_PLOTS[4], "evaluation during training")]))
    if first.rollouts is not None and len(first.rollouts) and prompts is not None:
        excerpt = rollout_excerpt(first.rollouts, prompts)
        if excerpt:
            cols = list(excerpt[0])
            sections.append(Section("Training rollouts: best and worst completion of a group", [
                f"From {first_label}'s rollouts/ (every training completion with its rewards and advantage): at a few "
                "steps, the group with the widest reward spread, its best and its worst completion."],
                tables=[Table(cols, [[_cut(str(r[c])) for c in cols] for r in excerpt], long=True,
                             item="Rollout group")]))
    return sections


def _rl_report(exp: str, cfg: Experiment, s: dict, runs: dict[str, Run], out: Path, tables: dict | None,
               n_samples: int) -> Report:
    from rlmeta.evaluation.evaluate import reward_gaming, usual_answer_warning

    r = s["reward"]
    key = [
        ("Reward, base (mean per prompt)", fmt(r["base_mean"])),
        ("Reward, trained (mean per prompt)", fmt(r["trained_mean"])),
        ("Difference trained − base", f"{fmt(r['diff_mean'], signed=True)} (95% CI {fmt_ci(r['diff_ci95'])})"),
        ("Prompts × completions per policy", f"{r['n_prompts']} prompts, {r.get('n_samples')} completions"),
        ("Training seeds", ", ".join(s.get("runs", {})) or "one"),
    ]
    for name, a in s.get("accuracy", {}).items():
        key.append((f"Accuracy {name}: base → trained", f"{fmt(a['base'])} → {fmt(a['trained'])}"))
    length = s["length"]
    key.append(("Completion length (tokens): base → trained",
                f"{fmt(length['base'], 1)} → {fmt(length['trained'], 1)}"))
    sections = training_sections(exp, runs, out, None if tables is None else tables["prompts"])
    comp = {"total reward": r, **s.get("components", {})}
    sec = Section("Base versus trained on the held-out prompts", [
        "Each prompt's completions are averaged per policy; the difference is trained − base per prompt, and "
        f"the 95% interval comes from {s['bootstrap']['resamples']} paired bootstrap resamples of the prompts "
        f"(seed {s['bootstrap']['seed']}). Components are unweighted; the total is the weighted sum."
        + (" With several training seeds, trained is every seed's completions pooled per prompt."
           if len(s.get("runs", {})) > 1 else "")],
        tables=[_comparison_table(comp, "reward", weights=True)],
        images=[(RL_PLOTS[2], "paired differences")])
    plots.paired_differences(s, out / RL_PLOTS[2], f"{exp}: trained − base with 95% bootstrap intervals")
    if tables is not None:
        trained = pd.concat([df for label, df in tables["rewards"].items() if label != "base"])
        plots.reward_distributions({"base": tables["rewards"]["base"], "trained": trained},
                                   list(s.get("components", {})), out / RL_PLOTS[1], f"{exp}: reward distributions")
        sec.images.insert(0, (RL_PLOTS[1], "reward distributions"))
    sections.append(sec)
    sections.append(seeds_section(s, out, exp))
    metrics_sec = Section("Task metrics", [
        "Accuracy uses the reference answer; format rates are shares of completions. "
        "'stopped' is the share that ended with a stop token rather than the length limit. pass@k is the unbiased "
        "estimator of Chen et al. 2021 (at least one of k samples correct), maj@k the majority answer of the first "
        "k samples (ties: the answer seen first), mean@k the plain accuracy."])
    if s.get("accuracy"):
        metrics_sec.tables.append(_comparison_table(s["accuracy"], "accuracy (mean@k)", "base", "trained"))
    for kind, label in (("pass_at_k", "pass@k"), ("maj_at_k", "maj@k")):
        entries = {f"{label.replace('k', k)} {name}": c for name, byk in s.get(kind, {}).items()
                   for k, c in sorted(byk.items(), key=lambda kv: int(kv[0]))}
        if entries:
            metrics_sec.tables.append(_comparison_table(entries, label, "base", "trained"))
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
        label = next(p for p in tables["responses"] if p != "base")
        shown = {k: {"base": v["base"], "trained": v[label]} for k, v in tables.items() if k != "prompts"}
        sections.append(Section("Sample completions on the same prompts", [
            f"The first sample of the base policy and of {label} on the first {n_samples} held-out prompts (texts are "
            f"cut at {MAX_CHARS} characters)."],
            tables=[sample_table(tables["prompts"], shown["responses"], shown["rewards"], n_samples)]))
    warnings = [w for w in (reward_gaming(s), usual_answer_warning(s)) if w]
    return Report(f"{exp}: {cfg.algorithm.upper()} report", key, sections, lead=lead_lines(s), warnings=warnings)


def _ci_text(c: dict | None, digits: int = 4, signed: bool = False) -> str:
    """'5.4123 [5.38, 5.44]' of a {mean, ci95} block."""
    if not c or c.get("mean") is None:
        return "n/a"
    ci = c.get("ci95") or [None, None]
    return (f"{fmt(c['mean'], digits, signed)} [{fmt(ci[0], digits, signed)}, {fmt(ci[1], digits, signed)}]")


def _methods_sections(exp: str, ad: dict, out: Path) -> tuple[list, list]:
    """Key numbers and sections of a summary with methods (base, baselines, the experiment's method)."""
    methods, main = ad["methods"], ad.get("method")
    key = [(f"Post-adaptation query loss on held-out subjects, {m} [95% CI]", _ci_text(ad[m]["test"]["post_loss"]))
           for m in methods]
    key += [(f"{pair} (post-adaptation loss, held-out subjects; negative: {pair.split(' - ')[0]} lower)",
             _ci_text(d["test"]["post_loss"], signed=True)) for pair, d in ad.get("paired", {}).items()]
    cols = ["method", "pre-adaptation loss", "post-adaptation loss", "gain (pre − post)", "accuracy", "episodes",
            "outer steps", "gradient passes", "tokens"]
    sections = []
    for group, ttl, text in (
            ("test", "Adaptation on held-out subjects",
             f"Subjects no method trained on: {', '.join(ad.get('test_subjects', []))}. "),
            ("train_rows", "Adaptation on held-out rows of the training subjects",
             f"Training subjects ({', '.join(ad.get('train_subjects', []))}), rows meta-training never sampled. ")):
        rows = []
        for m in methods:
            b, c = ad[m][group], ad[m].get("compute") or {}
            rows.append([m + (" (this experiment)" if m == main else ""), _ci_text(b["pre_loss"]),
                         _ci_text(b["post_loss"]), _ci_text(b["gain"], signed=True), _ci_text(b["accuracy"], 3),
                         fmt(b["post_loss"].get("n")), fmt(c.get("outer_steps")), fmt(c.get("grad_passes")),
                         fmt(c.get("train_tokens"))])
        paired = [[pair, _ci_text(d[group]["post_loss"], signed=True), _ci_text(d[group]["gain"], signed=True)]
                  for pair, d in ad.get("paired", {}).items()]
        st = ad.get("settings", {})
        sections.append(Section(ttl, [
            text + f"Each episode adapts every initialisation with {st.get('inner_steps')} SGD steps (lr "
            f"{st.get('inner_lr')}) on the same seeded support set ({st.get('support_batch')} problems) and measures "
            f"the query loss on {st.get('eval_query')} other problems; means with 95% bootstrap intervals over "
            "episodes; paired differences on the same episodes. The trained methods had the same budget (outer "
            "steps, gradient passes and tokens in them)."],
            tables=[Table(cols, rows), Table(["difference", "post-adaptation loss [95% CI]", "gain [95% CI]"],
                                             paired)]))
    plots.adaptation_curves({"adaptation": ad}, out / FOMAML_PLOTS[2], f"{exp}: adaptation curves")
    sections.append(Section("Adaptation curves and meta-validation", [
        "Mean query loss after k = 0, 1, ..., K inner SGD steps per method (band: 95% bootstrap interval over "
        "episodes); right: the post-adaptation query loss on the held-out subjects during training "
        "(meta.validate_every)."], images=[(FOMAML_PLOTS[2], "adaptation curves")]))
    return key, sections


def _fomaml_report(exp: str, cfg: Experiment, s: dict, metrics: pd.DataFrame | None, out: Path) -> Report:
    ad = s.get("adaptation", {})
    if ad.get("methods"):
        key, sections = _methods_sections(exp, ad, out)
        if metrics is not None and len(metrics):
            plots.meta_training(metrics, out / FOMAML_PLOTS[0], f"{exp}: meta-training curves ({ad.get('method')})")
            sections.append(Section("Training curves", [
                f"{len(metrics)} outer steps of {ad.get('method')}. meta/loss is the query loss after the inner "
                "adaptation steps (multitask: at the weights themselves); the adaptation gap is the query loss "
                "before minus after adaptation."], images=[(FOMAML_PLOTS[0], "meta-training curves")]))
        plots.adaptation_bars(s, out / FOMAML_PLOTS[1], f"{exp}: adaptation per subject (base vs {ad.get('method')})")
        subj = ad.get("per_subject", {})
        cols = ["base_pre_adapt_loss", "meta_pre_adapt_loss", "base_query_loss", "meta_query_loss", "base_accuracy",
                "meta_accuracy"]
        rows = [[k + (" (held out)" if v.get("held_out_subject") else "")] + [fmt(v.get(c), 4) for c in cols]
                for k, v in subj.items()]
        sections.append(Section("Adaptation per subject", [
            f"Means over each subject's episodes, base initialisation against {ad.get('method')}."],
            tables=[Table(["subject", "base pre-adapt loss", f"{ad.get('method')} pre-adapt loss", "base query loss",
                           f"{ad.get('method')} query loss", "base accuracy", f"{ad.get('method')} accuracy"], rows)],
            images=[(FOMAML_PLOTS[1], "adaptation per subject")]))
        return Report(f"{exp}: meta-learning report ({ad.get('method')})", key, sections,
                      lead=[ad["conclusion"]] if ad.get("conclusion") else [])
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
    plots.adaptation_curves(s, out / FOMAML_PLOTS[2], f"{exp}: adaptation curves")
    sections.append(Section("Adaptation curves", ["Not recorded by this evaluation."],
                            images=[(FOMAML_PLOTS[2], "adaptation curves")]))
    return Report(f"{exp}: FOMAML report", key, sections)


def build_report(exp: str, cfg: Experiment, summary: dict, metrics: pd.DataFrame | None, out_dir: str | Path,
                 tables: dict | None = None, runs: dict[str, Run] | None = None) -> Report:
    """Draw the figures into ``out_dir`` and return the report of one experiment.

    ``metrics``: FOMAML's train_metrics; RL: ``runs`` (label -> its tables; a bare ``metrics`` is taken as the
    one run) and ``tables``: prompts, responses {base, <label>...} and rewards {base, <label>...} DataFrames.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.algorithm == "fomaml":
        rep = _fomaml_report(exp, cfg, summary, metrics, out)
    else:
        runs = runs or {next(iter(summary.get("runs", {"trained": None}))): Run(metrics=metrics)}
        rep = _rl_report(exp, cfg, summary, runs, out, tables, cfg.eval.report_samples)
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
    out = [f"# {rep.title}", ""]
    out += [f"> **Warning.** {w}\n" for w in rep.warnings]
    out += [f"**{line}**" if i == 0 else line for i, line in enumerate(rep.lead)] + ([""] if rep.lead else [])
    out += ["## Key numbers", ""]
    out += [f"- **{k}**: {v}" for k, v in rep.key_numbers] + [""]
    for sec in rep.sections:
        out += [f"## {sec.title}", ""] + [t + "\n" for t in sec.text]
        for fname, alt in sec.images:
            out += [f"![{alt}]({fname})", ""]
        for tb in sec.tables:
            if tb.long:
                for i, row in enumerate(tb.rows, 1):
                    out += [f"### {tb.item} {i}", ""]
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
.warn{background:#fff4e5;border:1px solid #f0a030;border-radius:6px;padding:.6em 1.2em;margin:.8em 0}
.lead p{margin:.25em 0}.lead p.headline{font-size:1.25em;font-weight:600}.lead p.sub{color:#333}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def to_html(rep: Report, image_dir: str | Path) -> str:
    """Self-contained HTML: images from ``image_dir`` inlined as data URIs; all text escaped."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(rep.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(rep.title)}</h1>"]
    parts += [f"<div class='warn' id='{'reward-accuracy-warning' if i == 0 else f'warning-{i}'}' role='alert'>"
              f"<strong>Warning.</strong> {e(w)}</div>" for i, w in enumerate(rep.warnings)]
    if rep.lead:
        parts.append("<section class='lead' id='lead'>" + "".join(
            f"<p class='{'headline' if i == 0 else 'sub'}'>{e(line)}</p>" for i, line in enumerate(rep.lead))
            + "</section>")
    parts.append("<section class='key' id='key-numbers'><h2>Key numbers</h2><dl>")
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


def _read_folder(path) -> pd.DataFrame | None:
    """Every parquet file of a folder (rollouts/), in name order, as one DataFrame; None when it has none."""
    files = sorted(Path(path).glob("*.parquet"))
    return pd.concat([_read(f) for f in files], ignore_index=True) if files else None


def command(p: argparse.ArgumentParser):
    """``rlmeta report``: report.md, report.html and the figures of one experiment into --out-dir."""
    from rlmeta.cli import existing_file, settings_type
    from rlmeta.settings import Experiment

    p.add_argument("--experiment", required=True)
    p.add_argument("--config", required=True, type=settings_type(Experiment, "config"),
                   help="the experiment's config block (JSON or a file)")
    p.add_argument("--summary", required=True, type=existing_file, help="eval/summary.json")
    p.add_argument("--metrics", type=existing_file, help="FOMAML: train_metrics.parquet (meta-training curves)")
    p.add_argument("--prompts", type=existing_file, help="prompts.parquet (RL: sample completions)")
    p.add_argument("--responses-base", type=existing_file, help="responses/base.parquet (RL)")
    p.add_argument("--rewards-base", type=existing_file, help="rewards/base.parquet (RL)")
    p.add_argument("--run", nargs=6, action="append", default=[],
                   metavar=("LABEL", "METRICS", "CURVE", "ROLLOUTS", "RESPONSES", "REWARDS"),
                   help="RL: a training run: its label (seed<N>), train_metrics.parquet, eval_curve.parquet, "
                        "rollouts folder, and held-out responses and rewards parquet; repeat per seed")
    p.add_argument("--out-dir", required=True, help="folder for report.md, report.html and the PNGs")

    def run(a):
        from rlmeta.errors import UserError
        from rlmeta.io import write_text

        t0 = time.perf_counter()
        summary = json.loads(Path(a.summary).read_text())
        metrics = _read(a.metrics) if a.metrics else None
        for label, *paths in a.run:
            for path in paths:
                if not Path(path).exists():
                    raise UserError(f"--run {label}: {path}: no such file or folder")
        runs = {label: Run(metrics=_read(m), curve=_read(c), rollouts=_read_folder(r))
                for label, m, c, r, _, _ in a.run} or None
        tables = None
        if a.prompts and a.responses_base and a.rewards_base and a.run:
            tables = {"prompts": _read(a.prompts),
                      "responses": {"base": _read(a.responses_base), **{x[0]: _read(x[4]) for x in a.run}},
                      "rewards": {"base": _read(a.rewards_base), **{x[0]: _read(x[5]) for x in a.run}}}
        rep = build_report(a.experiment, a.config, summary, metrics, a.out_dir, tables, runs)
        out = Path(a.out_dir)
        write_text(out / "report.md", to_markdown(rep))
        write_text(out / "report.html", to_html(rep, out))
        log.info("%s: report -> %s in %.1fs", a.experiment, out, time.perf_counter() - t0)
    return run
