# Evaluation of RL experiments: base versus trained on the same held-out prompts.


rule evaluate:
    """Paired comparison (bootstrap 95% intervals over prompts) of rewards, accuracies, formats and lengths."""
    input:
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses_base=f"{R}/{{exp}}/responses/base.parquet",
        responses_trained=f"{R}/{{exp}}/responses/trained.parquet",
        rewards_base=f"{R}/{{exp}}/rewards/base.parquet",
        rewards_trained=f"{R}/{{exp}}/rewards/trained.parquet",
        checkpoint=f"{R}/{{exp}}/checkpoints/final",
    output:
        f"{R}/{{exp}}/eval/summary.json",
    params:
        seed=SEED,
        base=lambda w: base_policy(w.exp),
        cfg=lambda w: as_json(EXPERIMENTS[w.exp]),
        bootstrap=lambda w: EXPERIMENTS[w.exp]["eval"]["bootstrap"],
        timeout=lambda w: EXPERIMENTS[w.exp]["reward_params"].get("math_correct", {}).get("timeout_s", 5.0),
    log:
        f"{R}/logs/{{exp}}/evaluate.log",
    wildcard_constraints:
        exp=exps_where(algorithm=("grpo", "gspo")),
    threads: 2
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/evaluate.py --experiment {wildcards.exp} --prompts {input.prompts}"
        " --responses-base {input.responses_base} --responses-trained {input.responses_trained}"
        " --rewards-base {input.rewards_base} --rewards-trained {input.rewards_trained}"
        " --checkpoint {input.checkpoint} --base-checkpoint {params.base:q} --config-json {params.cfg:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed} --workers {threads} --timeout {params.timeout}"
        " --out {output} > {log} 2>&1"
