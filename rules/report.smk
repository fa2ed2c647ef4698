# Reports: one per experiment (Markdown, self-contained HTML, PNGs registered for `snakemake --report`)
# and the summary across experiments.

CAPTIONS = "../report/captions"


report: "../report/captions/workflow.rst"


# Helpers are lambdas: `snakemake --lint` flags `def` next to rules in one file.
REPORTED = CHOSEN
"""Experiments in the cross-experiment summary (those `all` builds)."""

_fig = lambda name, sub: report(
    f"{R}/{{exp}}/report/{name}.png", caption=f"{CAPTIONS}/{name}.rst", category="{exp}", subcategory=sub
)


rule report:
    """Report of an RL experiment: training curves, reward distributions, paired differences, samples."""
    input:
        summary=f"{R}/{{exp}}/eval/summary.json",
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses_base=f"{R}/{{exp}}/responses/base.parquet",
        responses_trained=f"{R}/{{exp}}/responses/trained.parquet",
        rewards_base=f"{R}/{{exp}}/rewards/base.parquet",
        rewards_trained=f"{R}/{{exp}}/rewards/trained.parquet",
    output:
        md=f"{R}/{{exp}}/report/report.md",
        html=report(f"{R}/{{exp}}/report/report.html", caption=f"{CAPTIONS}/report_html.rst", category="{exp}", subcategory="report"),
        curves=_fig("training_curves", "training"),
        dists=_fig("reward_distributions", "evaluation"),
        diffs=_fig("paired_differences", "evaluation"),
    params:
        cfg=lambda w: as_json(EXPERIMENTS[w.exp]),
        out_dir=lambda w, output: os.path.dirname(output.md),
        samples=6,
    log:
        f"{R}/logs/{{exp}}/report.log",
    wildcard_constraints:
        exp=exps_where(algorithm=("grpo", "gspo")),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/report.py --experiment {wildcards.exp} --config-json {params.cfg:q} --summary {input.summary}"
        " --metrics {input.metrics} --prompts {input.prompts}"
        " --responses-base {input.responses_base} --responses-trained {input.responses_trained}"
        " --rewards-base {input.rewards_base} --rewards-trained {input.rewards_trained}"
        " --samples {params.samples} --out-dir {params.out_dir} > {log} 2>&1"


rule report_fomaml:
    """Report of a FOMAML experiment: meta-training curves and base- versus meta-init adaptation per subject."""
    input:
        summary=f"{R}/{{exp}}/eval/summary.json",
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    output:
        md=f"{R}/{{exp}}/report/report.md",
        html=report(f"{R}/{{exp}}/report/report.html", caption=f"{CAPTIONS}/report_html.rst", category="{exp}", subcategory="report"),
        curves=_fig("meta_training", "training"),
        bars=_fig("adaptation", "evaluation"),
    params:
        cfg=lambda w: as_json(EXPERIMENTS[w.exp]),
        out_dir=lambda w, output: os.path.dirname(output.md),
    log:
        f"{R}/logs/{{exp}}/report.log",
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/report.py --experiment {wildcards.exp} --config-json {params.cfg:q} --summary {input.summary}"
        " --metrics {input.metrics} --out-dir {params.out_dir} > {log} 2>&1"


rule summary:
    """One row per experiment with its headline numbers: results/summary.parquet and summary.html."""
    input:
        summaries=[f"{R}/{e}/eval/summary.json" for e in REPORTED],
        metrics=[f"{R}/{e}/train_metrics.parquet" for e in REPORTED],
    output:
        parquet=f"{R}/summary.parquet",
        html=report(f"{R}/summary.html", caption=f"{CAPTIONS}/summary.rst", category="summary"),
    params:
        exps=as_json({e: EXPERIMENTS[e] for e in REPORTED}),
        results=lambda w, output: os.path.dirname(output.parquet) or ".",
    log:
        f"{R}/logs/summary.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/summarize.py --results {params.results} --experiments-json {params.exps:q}"
        " --out-parquet {output.parquet} --out-html {output.html} > {log} 2>&1"
