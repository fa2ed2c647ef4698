"""rlmeta: RSS/GSM8K/MATH -> prompts -> responses -> rewards -> training -> evaluation -> reports.

Run `snakemake --cores 2` (or `make run`) for the embedded default; see README.md and docs/.
"""

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/prompts.smk"
include: "rules/rollouts.smk"
include: "rules/train.smk"
include: "rules/meta.smk"
include: "rules/provenance.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


localrules:
    all,
    fetch_rss,
    build_headlines,
    prepare_gsm8k,
    prepare_math,
    split_math_tasks,
    build_model,
    make_prompts,
    score,
    evaluate,
    provenance,
    report,
    report_fomaml,
    summary,


rule all:
    default_target: True
    input:
        final_targets(),
