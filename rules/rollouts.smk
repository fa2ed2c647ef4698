# Policies -> responses on the held-out prompts -> rewards.


rule generate:
    """Sample completions of the base or trained policy on the eval prompts (same seeds for both)."""
    input:
        model=lambda w: policy_input(w.exp, w.policy),
        prompts=f"{R}/{{exp}}/prompts.parquet",
    output:
        f"{R}/{{exp}}/responses/{{policy}}.parquet",
    params:
        model=lambda w: policy_path(w.exp, w.policy),
        backend=lambda w: EXPERIMENTS[w.exp]["backend"],
        ev=lambda w: eval_settings(w.exp),
        check=lambda w: check_platform(w.exp),
    log:
        f"{R}/logs/{{exp}}/generate_{{policy}}.log",
    wildcard_constraints:
        policy="base|trained",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    conda:
        lambda w: env_for(w.exp)
    shell:
        "python scripts/generate.py --model {params.model:q} --backend {params.backend} --prompts {input.prompts}"
        " --split {params.ev[split]} --samples {params.ev[samples]} --temperature {params.ev[temperature]}"
        " --top-p {params.ev[top_p]} --max-new-tokens {params.ev[max_new_tokens]} --seed {params.ev[seed]}"
        " --max-prompts {params.ev[max_prompts]} --policy-name {wildcards.policy} --out {output} > {log} 2>&1"


rule score:
    """Score any responses table with the experiment's rewards (total plus one column per reward)."""
    input:
        prompts=f"{R}/{{exp}}/prompts.parquet",
        responses=f"{R}/{{exp}}/responses/{{policy}}.parquet",
    output:
        f"{R}/{{exp}}/rewards/{{policy}}.parquet",
    params:
        rewards=lambda w: as_json(EXPERIMENTS[w.exp]["rewards"]),
        reward_params=lambda w: as_json(EXPERIMENTS[w.exp]["reward_params"]),
    log:
        f"{R}/logs/{{exp}}/score_{{policy}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/score.py --prompts {input.prompts} --responses {input.responses} --out {output}"
        " --rewards-json {params.rewards:q} --params-json {params.reward_params:q} --workers {threads} > {log} 2>&1"
