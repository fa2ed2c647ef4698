"""Report figures (matplotlib, Agg backend), each written atomically as a PNG.

Every function takes plain data (DataFrames, the summary.json dict) and a path, and draws
titled panels with labelled axes; a metric that was not recorded gets an empty panel
saying so rather than an error.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from rlmeta.io import atomic_path

COLORS = {"base": "#7f7f7f", "trained": "#1f77b4", "meta": "#d62728"}
DPI = 110


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _series(df: pd.DataFrame, col: str) -> pd.Series | None:
    if col not in df or df[col].isna().all():
        return None
    return df[col].astype(float)


def _empty(ax, title: str, what: str = "not recorded") -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax, df, cols: dict[str, str], title: str, ylabel: str, logy: bool = False,
          xlabel: str = "training step") -> None:
    """Plot ``cols`` (column -> legend label) against step; an empty panel when none recorded.
    ``logy``: log scale when every value is positive and they span more than 20x."""
    drawn = 0
    for col, label in cols.items():
        s = _series(df, col)
        if s is not None:
            ax.plot(df["step"], s, marker="." if len(df) <= 50 else None, label=label)
            drawn += 1
    if not drawn:
        return _empty(ax, title)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    vals = pd.concat([s for c in cols if (s := _series(df, c)) is not None]).dropna()
    if logy and (vals > 0).all() and vals.max() > 20 * vals.min():
        ax.set_yscale("log")
    if drawn > 1 or len(cols) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def training_curves(metrics: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """RL training: reward mean ± std, per-reward means, loss, KL, clip fraction, gradient norm,
    seconds per step and mean completion length (2 x 4 panels)."""
    df = metrics.sort_values("step")
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    ax = axes[0, 0]
    mean, std = _series(df, "reward_mean"), _series(df, "reward_std")
    if mean is None:
        _empty(ax, "Total reward")
    else:
        ax.plot(df["step"], mean, color=COLORS["trained"], label="mean over rollouts")
        if std is not None:
            ax.fill_between(df["step"], mean - std, mean + std, color=COLORS["trained"], alpha=0.2, label="± 1 std")
        ax.set(title="Total reward (weighted sum)", xlabel="training step", ylabel="reward")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    comps = {c: c.split("/", 1)[1] for c in df.columns if c.startswith("reward/")}
    _line(axes[0, 1], df, comps, "Reward components (unweighted mean)", "reward in [0, 1]")
    _line(axes[0, 2], df, {"loss": "loss"}, "Policy loss", "loss")
    _line(axes[0, 3], df, {"kl": "KL(policy ‖ reference)"}, "KL to reference", "KL (nats/token)")
    _line(axes[1, 0], df, {"clip_ratio": "clipped share"}, "Clip fraction", "share of tokens clipped")
    _line(axes[1, 1], df, {"grad_norm": "before clipping"}, "Gradient norm", "L2 norm", logy=True)
    _line(axes[1, 2], df, {"step_seconds": "wall clock"}, "Time per step", "seconds")
    _line(axes[1, 3], df, {"completion_len_mean": "mean"}, "Completion length", "tokens")
    fig.suptitle(title or "Training curves", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def reward_distributions(frames: dict[str, pd.DataFrame], components: list[str], path: str | Path,
                         title: str = "") -> Path:
    """Base versus trained: histogram of the total reward per completion, and box plots with the
    per-completion points of each component."""
    widths = [1, max(1.2, 0.45 * len(components))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.5), gridspec_kw={"width_ratios": widths})
    allv = np.concatenate([frames[p]["reward"].to_numpy(float) for p in frames])
    bins = np.linspace(np.nanmin(allv), np.nanmax(allv) + 1e-9, 21) if allv.size else 10
    for pol, df in frames.items():
        v = df["reward"].to_numpy(float)
        ax1.hist(v, bins=bins, alpha=0.55, color=COLORS[pol], label=f"{pol} (mean {np.nanmean(v):.3f}, n={v.size})")
    ax1.set(title="Total reward per completion", xlabel="reward (weighted sum)", ylabel="completions")
    ax1.legend(fontsize=9)
    ax1.grid(alpha=0.3)
    if not components:
        _empty(ax2, "Reward components", "no components")
    else:
        rng = np.random.default_rng(0)
        for k, comp in enumerate(components):
            for j, pol in enumerate(frames):
                v = frames[pol][comp].dropna().to_numpy(float)
                pos = k * 3 + j
                ax2.boxplot([v], positions=[pos], widths=0.7, patch_artist=True, showfliers=False,
                            boxprops={"facecolor": COLORS[pol], "alpha": 0.35}, medianprops={"color": "black"})
                ax2.scatter(pos + rng.uniform(-0.22, 0.22, v.size), v, s=8, color=COLORS[pol], alpha=0.6,
                            label=pol if k == 0 else None)
        ax2.set_xticks([k * 3 + 0.5 for k in range(len(components))], components, rotation=20)
        ax2.set(title="Reward components per completion (box: quartiles; dots: completions)",
                ylabel="reward in [0, 1]")
        ax2.legend(fontsize=9)
        ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Base versus trained reward distributions", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def _forest(ax, rows: list[tuple[str, float, float, float]], title: str, xlabel: str) -> None:
    if not rows:
        return _empty(ax, title, "nothing to compare")
    ys = np.arange(len(rows))[::-1]
    for y, (_, mean, low, high) in zip(ys, rows):
        color = "#2ca02c" if low > 0 else "#d62728" if high < 0 else "0.3"
        ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4, ms=7)
        ax.annotate(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]", (high, y), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=1, ls="--")
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.set(title=title, xlabel=xlabel)
    lo, hi = min(r[2] for r in rows), max(r[3] for r in rows)
    pad = max(hi - lo, 1e-3)
    ax.set_xlim(min(lo, 0) - 0.1 * pad, max(hi, 0) + 0.6 * pad)
    ax.grid(alpha=0.3, axis="x")


def _rows(entries: dict, prefix: str = "") -> list[tuple[str, float, float, float]]:
    out = []
    for name, e in entries.items():
        if e.get("diff_mean") is not None and e.get("diff_ci95") and None not in e["diff_ci95"]:
            out.append((prefix + name, e["diff_mean"], *e["diff_ci95"]))
    return out


def paired_differences(summary: dict, path: str | Path, title: str = "") -> Path:
    """Forest plot of trained - base per-prompt mean differences with 95% bootstrap intervals:
    total reward and components (left), accuracies and format rates (right)."""
    rewards = _rows({"total reward": summary["reward"]}) + _rows(summary.get("components", {}))
    rates = _rows(summary.get("accuracy", {}), "accuracy: ") + _rows(summary.get("format", {}), "format: ")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, max(3.5, 0.55 * max(len(rewards), len(rates)) + 1.8)))
    _forest(ax1, rewards, "Reward: trained − base", "difference in mean reward per prompt")
    _forest(ax2, rates, "Accuracy and format: trained − base", "difference in rate (fraction of completions)")
    n = summary["reward"].get("n_prompts")
    fig.suptitle(title or f"Paired differences with 95% bootstrap intervals ({n} prompts)", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def meta_training(metrics: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """FOMAML: meta loss (query loss after adaptation) and before, average adaptation gap, the gap
    per task, gradient norm, seconds per step, learning rate (2 x 3 panels)."""
    df = metrics.sort_values("step")
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    _line(axes[0, 0], df, {"meta/loss": "after adaptation (meta/loss)", "meta/query_loss_pre": "before adaptation",
                           "val/query_loss_post": "meta-validation: held-out subjects, after adaptation"},
          "Query loss", "cross-entropy (nats/token)", xlabel="outer step")
    _line(axes[0, 1], df, {"meta/avg_adaptation_gap": "mean over tasks"}, "Adaptation gap (pre − post)",
          "loss decrease (nats/token)", xlabel="outer step")
    gaps = {c: c.rsplit("/", 1)[0] for c in df.columns if c.endswith("/adaptation_gap") and not c.startswith("meta/")}
    _line(axes[0, 2], df, gaps, "Adaptation gap per task", "loss decrease (nats/token)", xlabel="outer step")
    _line(axes[1, 0], df, {"grad_norm": "meta-gradient"}, "Gradient norm", "L2 norm", logy=True, xlabel="outer step")
    _line(axes[1, 1], df, {"step_seconds": "wall clock"}, "Time per outer step", "seconds", xlabel="outer step")
    _line(axes[1, 2], df, {"lr": "outer learning rate"}, "Learning rate", "learning rate", xlabel="outer step")
    fig.suptitle(title or "Meta-training curves", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def adaptation_bars(summary: dict, path: str | Path, title: str = "") -> Path:
    """FOMAML: post-adaptation query loss per subject, base init versus meta init (and accuracy
    when recorded)."""
    ad = summary.get("adaptation", {})
    subj = ad.get("per_subject", {})
    names = sorted(subj)
    has_acc = any(subj[s].get("base_accuracy") is not None for s in names)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(16 if has_acc else 10, 5.5), squeeze=False)
    x = np.arange(len(names))
    panels = [("query_loss", "Query loss after adaptation (lower is better)", "cross-entropy (nats/token)")]
    if has_acc:
        panels.append(("accuracy", "Query accuracy after adaptation (higher is better)", "accuracy"))
    for ax, (key, ttl, ylabel) in zip(axes[0], panels):
        if not names:
            _empty(ax, ttl, "no subjects")
            continue
        for j, (pol, label) in enumerate([("base", "base init"), ("meta", "meta init")]):
            vals = [subj[s].get(f"{pol}_{key}") for s in names]
            vals = [np.nan if v is None else v for v in vals]
            bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, color=COLORS[pol], label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=25, ha="right")
        ax.set(title=ttl, ylabel=ylabel, xlabel="MATH subject")
        ax.margins(y=0.18)
        ax.legend(loc="upper center", ncol=2)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Adaptation per subject: base versus meta-learned initialisation", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


METHOD_COLORS = {"base": "#7f7f7f", "multitask": "#2ca02c", "fomaml": "#d62728", "reptile": "#9467bd"}


def adaptation_curves(summary: dict, path: str | Path, title: str = "") -> Path:
    """Meta-learning: mean query loss after k = 0..K inner SGD steps per method (95% bootstrap band over
    episodes) on the held-out subjects and on the training subjects' held-out rows, and the meta-validation
    loss during training per method."""
    ad = summary.get("adaptation", {})
    methods = ad.get("methods", [])
    k = ad.get("settings", {}).get("inner_steps")
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for ax, group, ttl in ((axes[0], "test", "Held-out subjects"), (axes[1], "train_rows",
                                                                      "Training subjects, held-out rows")):
        drawn = 0
        for m in methods:
            curve = ad.get(m, {}).get(group, {}).get("curve") or []
            if not curve or curve[0].get("mean") is None:
                continue
            xs = np.arange(len(curve))
            mid = np.array([c["mean"] for c in curve], dtype=float)
            lo = np.array([c["ci95"][0] for c in curve], dtype=float)
            hi = np.array([c["ci95"][1] for c in curve], dtype=float)
            color = METHOD_COLORS.get(m)
            ax.plot(xs, mid, marker="o", color=color, label=m)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
            drawn += 1
        if not drawn:
            _empty(ax, ttl, "not evaluated")
            continue
        if k:
            ax.axvline(k, color="black", lw=1, ls="--", label=f"k = inner_steps ({k})")
        ax.set(title=f"{ttl}: query loss after k SGD steps", xlabel="inner SGD steps k on the support set",
               ylabel="cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    drawn = 0
    for m in methods:
        val = ad.get(m, {}).get("validation") or []
        if val:
            ax.plot([v["step"] for v in val], [v["post_loss"] for v in val], marker="o", color=METHOD_COLORS.get(m),
                    label=f"{m}: after adaptation")
            ax.plot([v["step"] for v in val], [v["pre_loss"] for v in val], ls=":", color=METHOD_COLORS.get(m),
                    label=f"{m}: before")
            drawn += 1
    if drawn:
        ax.set(title="Meta-validation on the held-out subjects", xlabel="outer step",
               ylabel="query loss (nats/token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        _empty(ax, "Meta-validation on the held-out subjects", "not recorded (meta.validate_every 0)")
    fig.suptitle(title or "Adaptation curves", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def experiments_forest(rows: list[dict], path: str | Path) -> Path:
    """Summary page: reward difference with 95% interval per RL experiment."""
    data = [(r["experiment"], r["reward_diff"], r["reward_diff_low"], r["reward_diff_high"]) for r in rows
            if r.get("reward_diff") is not None and r.get("reward_diff_low") is not None]
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.6 * len(data) + 1.5)))
    _forest(ax, data, "Trained − base total reward per experiment (95% bootstrap interval)",
            "difference in mean reward per prompt")
    fig.tight_layout()
    return _save(fig, path)


def seeds_plot(summary: dict, path: str | Path, title: str = "") -> Path:
    """Per training seed: the paired difference (trained - base) of each headline quantity with that seed's
    bootstrap interval over prompts, then the mean over seeds (t-interval) and the IQM (bootstrap over seeds)."""
    from rlmeta.evaluation.evaluate import headline_quantities, lookup

    quantities = headline_quantities(summary)
    runs, across = summary.get("runs", {}), summary.get("across_seeds", {})
    fig, axes = plt.subplots(1, len(quantities), figsize=(5.2 * len(quantities), max(3.2, 0.5 * len(runs) + 2.4)),
                             squeeze=False)
    for ax, q in zip(axes[0], quantities):
        rows = []
        for label, block in runs.items():
            c = lookup(block, q)
            if c is not None and c.get("diff_ci95") and None not in c["diff_ci95"]:
                rows.append((label, c["diff_mean"], *c["diff_ci95"], "o", COLORS["trained"]))
        a = across.get(q)
        if a is not None:
            for name, mid, ci, marker in (("mean over seeds", a["mean"], a.get("ci95"), "s"),
                                          ("IQM over seeds", a["iqm"], a.get("iqm_ci95"), "D")):
                lo, hi = ci if ci else (mid, mid)
                rows.append((f"{name} (n={a['n_seeds']})" + ("" if ci else ", no interval"), mid, lo, hi, marker,
                             "black"))
        if not rows:
            _empty(ax, q, "not measured")
            continue
        ys = np.arange(len(rows))[::-1]
        for y, (_, mid, lo, hi, marker, color) in zip(ys, rows):
            ax.errorbar(mid, y, xerr=[[mid - lo], [hi - mid]], fmt=marker, color=color, capsize=4, ms=7)
            ax.annotate(f"{mid:+.3f} [{lo:+.3f}, {hi:+.3f}]", (hi, y), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.axvline(0, color="black", lw=1, ls="--")
        ax.set_yticks(ys, [r[0] for r in rows])
        lo, hi = min(r[2] for r in rows), max(r[3] for r in rows)
        pad = max(hi - lo, 1e-3)
        ax.set_xlim(min(lo, 0) - 0.1 * pad, max(hi, 0) + 0.8 * pad)
        ax.set(title=q.replace("accuracy/", "accuracy: "), xlabel="trained − base")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title or "Per training seed: trained − base", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)
