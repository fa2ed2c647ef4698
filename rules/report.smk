# Reports: one per experiment (Markdown, self-contained HTML, PNGs registered for `snakemake --report`)
# and the summary across experiments.


report: "../report/captions/workflow.rst"


rule report:
    """Report of an RL experiment: training curves, reward distributions, paired differences, samples."""
    input:
        summary=f"{R}/{{exp}}/eval/summary.json",
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses_base=f"{R}/{{exp}}/responses/base.parquet",
        rewards_base=f"{R}/{{exp}}/rewards/base.parquet",
        runs=run_tables("metrics", "curve", "rollouts", "responses", "rewards"),
    output:
        md=f"{R}/{{exp}}/report/report.md",
        html=report(
            f"{R}/{{exp}}/report/report.html",
            caption="../report/captions/report_html.rst",
            category="{exp}",
            subcategory="report",
        ),
        curves=report(
            f"{R}/{{exp}}/report/training_curves.png",
            caption="../report/captions/training_curves.rst",
            category="{exp}",
            subcategory="training",
        ),
        dists=report(
            f"{R}/{{exp}}/report/reward_distributions.png",
            caption="../report/captions/reward_distributions.rst",
            category="{exp}",
            subcategory="evaluation",
        ),
        diffs=report(
            f"{R}/{{exp}}/report/paired_differences.png",
            caption="../report/captions/paired_differences.rst",
            category="{exp}",
            subcategory="evaluation",
        ),
        seeds=report(
            f"{R}/{{exp}}/report/seeds.png",
            caption="../report/captions/seeds.rst",
            category="{exp}",
            subcategory="evaluation",
        ),
        curve=report(
            f"{R}/{{exp}}/report/eval_curve.png",
            caption="../report/captions/eval_curve.rst",
            category="{exp}",
            subcategory="training",
        ),
    log:
        f"{R}/logs/{{exp}}/report.log",
    benchmark:
        f"{R}/benchmarks/report/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm=("grpo", "gspo")),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_of("report"),
        config=experiment_json,
        out_dir=out_dir_of,
        runs=run_args("metrics", "curve", "rollouts", "responses", "rewards"),
    shell:
        "rlmeta report --experiment {wildcards.exp} --config {params.config:q} --summary {input.summary}"
        " --prompts {input.prompts} --responses-base {input.responses_base} --rewards-base {input.rewards_base}"
        " {params.runs} --out-dir {params.out_dir} > {log} 2>&1"


rule report_fomaml:
    """Report of a meta-learning experiment: the methods' adaptation on held-out subjects with intervals, the
    adaptation curves, meta-validation and training curves, adaptation per subject."""
    input:
        summary=f"{R}/{{exp}}/eval/summary.json",
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    output:
        md=f"{R}/{{exp}}/report/report.md",
        html=report(
            f"{R}/{{exp}}/report/report.html",
            caption="../report/captions/report_html.rst",
            category="{exp}",
            subcategory="report",
        ),
        curves=report(
            f"{R}/{{exp}}/report/meta_training.png",
            caption="../report/captions/meta_training.rst",
            category="{exp}",
            subcategory="training",
        ),
        bars=report(
            f"{R}/{{exp}}/report/adaptation.png",
            caption="../report/captions/adaptation.rst",
            category="{exp}",
            subcategory="evaluation",
        ),
        adaptation_curve=report(
            f"{R}/{{exp}}/report/adaptation_curve.png",
            caption="../report/captions/adaptation_curve.rst",
            category="{exp}",
            subcategory="evaluation",
        ),
    log:
        f"{R}/logs/{{exp}}/report.log",
    benchmark:
        f"{R}/benchmarks/report_fomaml/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_of("report"),
        config=experiment_json,
        out_dir=out_dir_of,
    shell:
        "rlmeta report --experiment {wildcards.exp} --config {params.config:q} --summary {input.summary}"
        " --metrics {input.metrics} --out-dir {params.out_dir} > {log} 2>&1"


rule summary:
    """One row per experiment with its headline numbers: results/summary.parquet and summary.html."""
    input:
        summaries=summary_inputs("eval/summary.json"),
        metrics=summary_metrics(),
    output:
        parquet=f"{R}/summary.parquet",
        html=report(f"{R}/summary.html", caption="../report/captions/summary.rst", category="summary"),
    log:
        f"{R}/logs/summary.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_of("summarize"),
        experiments=reported_json(),
        results=out_dir_of,
    shell:
        "rlmeta summarize --results {params.results} --experiments {params.experiments:q}"
        " --out-parquet {output.parquet} --out-html {output.html} > {log} 2>&1"
