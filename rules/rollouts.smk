# Policies -> responses on the held-out prompts -> rewards.


rule generate:
    """Sample completions of the base policy, or of one training seed's policy (policy=seed<N>), on the eval
    prompts (the same sampling seeds for all)."""
    input:
        model=policy_input,
        prompts=f"{R}/{{exp}}/prompts.parquet",
        guard=mlx_guard,
    output:
        f"{R}/{{exp}}/responses/{{policy}}.parquet",
    log:
        f"{R}/logs/{{exp}}/generate_{{policy}}.log",
    benchmark:
        f"{R}/benchmarks/generate/{{exp}}/{{policy}}.tsv"
    wildcard_constraints:
        policy=r"base|seed\d+",
    conda:
        env_for
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    params:
        code=code_of("generate"),
        model=policy_path,
        backend=backend_of,
        sampling=sampling_json,
    shell:
        "rlmeta generate --model {params.model:q} --backend {params.backend} --prompts {input.prompts}"
        " --sampling {params.sampling:q} --policy-name {wildcards.policy} --out {output} > {log} 2>&1"


rule score:
    """Score a responses table: weighted reward, its components and the template's task metrics."""
    input:
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses=f"{R}/{{exp}}/responses/{{policy}}.parquet",
    output:
        f"{R}/{{exp}}/rewards/{{policy}}.parquet",
    log:
        f"{R}/logs/{{exp}}/score_{{policy}}.log",
    benchmark:
        f"{R}/benchmarks/score/{{exp}}/{{policy}}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_with_scorers("score"),
        rewards=rewards_json,
        template=template_of,
    shell:
        "rlmeta score --prompts {input.prompts} --responses {input.responses} --out {output}"
        " --template {params.template} --rewards {params.rewards:q} > {log} 2>&1"
