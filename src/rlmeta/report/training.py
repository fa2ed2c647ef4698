"""Report pieces from what the trainers write while they train: the held-out evaluation curve of every seed
(``eval_curve.parquet``) and an excerpt of the rollouts table (``rollouts/``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rlmeta.report.plots import _empty, _save, plt

SEED_COLORS = plt.get_cmap("tab10").colors


def curve_columns(curves: dict[str, pd.DataFrame]) -> list[str]:
    """The panels: reward, then every task metric (accuracy first, then format), then completion length."""
    cols: list[str] = []
    for df in curves.values():
        cols += [c for c in df.columns if c.startswith(("accuracy/", "format/")) and c not in cols]
    cols.sort(key=lambda c: (not c.startswith("accuracy/"), c))
    return ["reward", *cols, "completion_len_mean"]


def eval_curve_figure(curves: dict[str, pd.DataFrame], path: str | Path, title: str = "") -> Path:
    """One panel per quantity (``curve_columns``), one line per training seed against the step."""
    cols = curve_columns(curves) if curves else ["reward"]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.4 * len(cols), 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        label = {"reward": "reward (weighted)", "completion_len_mean": "completion length (tokens)"}.get(
            col, col.replace("accuracy/", "accuracy: ").replace("format/", "format: "))
        drawn = False
        for k, (seed, df) in enumerate(curves.items()):
            if col in df and len(df) and not df[col].isna().all():
                ax.plot(df["step"], df[col].astype(float), marker="o", ms=4, color=SEED_COLORS[k % 10], label=seed)
                drawn = True
        if not drawn:
            _empty(ax, label, "not evaluated during training")
            continue
        ax.set(title=label, xlabel="step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title or "Held-out evaluation during training", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def _user_text(prompt) -> str:
    """The last user message of a chat prompt (a list of {role, content}), else the prompt as text."""
    if isinstance(prompt, (list, tuple, np.ndarray)):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt)
    return str(prompt)


def excerpt_steps(steps, n: int) -> list[int]:
    """``n`` steps spread from the first to the last (all of them when there are fewer)."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= n:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


def rollout_excerpt(rollouts: pd.DataFrame, prompts: pd.DataFrame | None, n_steps: int = 3) -> list[dict]:
    """At ``n_steps`` steps from first to last: the group with the widest reward spread, its prompt, its best and
    its worst completion with their rewards and advantages (ties: the first in the table)."""
    texts = {} if prompts is None else {r.prompt_id: _user_text(r.prompt) for r in prompts.itertuples()}
    out = []
    for step in excerpt_steps(rollouts["step"], n_steps):
        at = rollouts[rollouts["step"] == step]
        spread = at.groupby("group")["reward"].agg(lambda r: r.max() - r.min())
        group = at[at["group"] == spread.idxmax()]
        best, worst = group.loc[group["reward"].idxmax()], group.loc[group["reward"].idxmin()]
        out.append({"step": step, "prompt": texts.get(best["prompt_id"], best["prompt_id"]),
                    "best reward (advantage)": f"{best['reward']:.3f} ({best['advantage']:+.2f})",
                    "best completion": best["completion"],
                    "worst reward (advantage)": f"{worst['reward']:.3f} ({worst['advantage']:+.2f})",
                    "worst completion": worst["completion"]})
    return out
