# Evaluation of RL experiments: base versus trained on the same held-out prompts.


rule evaluate:
    """Paired comparison (bootstrap 95% intervals over prompts) of rewards, accuracies, pass@k, maj@k, formats
    and lengths, per training seed and across seeds."""
    input:
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses_base=f"{R}/{{exp}}/responses/base.parquet",
        rewards_base=f"{R}/{{exp}}/rewards/base.parquet",
        runs=run_tables("responses", "rewards", "checkpoint"),
        provenance=f"{R}/{{exp}}/provenance.json",
    output:
        f"{R}/{{exp}}/eval/summary.json",
    log:
        f"{R}/logs/{{exp}}/evaluate.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm=("grpo", "gspo")),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_of("evaluate"),
        seed=SEED,
        base=base_policy_path,
        config=experiment_json,
        runs=run_args("responses", "rewards", "checkpoint"),
    shell:
        "rlmeta evaluate --experiment {wildcards.exp} --config {params.config:q} --prompts {input.prompts}"
        " --responses-base {input.responses_base} --rewards-base {input.rewards_base} {params.runs}"
        " --base-checkpoint {params.base:q} --seed {params.seed}"
        " --provenance {input.provenance}"
        " --out {output} > {log} 2>&1"
