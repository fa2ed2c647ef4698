# Tables -> an experiment's prompts (train and held-out eval splits, chat messages).


rule make_prompts:
    """Render the experiment's template over its dataset; split into train and eval."""
    input:
        dataset_tables,
    output:
        f"{R}/{{exp}}/prompts.parquet",
    log:
        f"{R}/logs/{{exp}}/make_prompts.log",
    benchmark:
        f"{R}/benchmarks/make_prompts/{{exp}}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_of("make-prompts"),
        seed=SEED,
        template=template_of,
        eval_fraction=eval_fraction,
        caps=prompt_caps,
    shell:
        "rlmeta make-prompts --experiment {wildcards.exp} --template {params.template} --inputs {input}"
        " --out {output} --eval-fraction {params.eval_fraction} --seed {params.seed} {params.caps} > {log} 2>&1"
