# Tables -> an experiment's prompts (train and held-out eval splits, chat messages).


rule make_prompts:
    """Render the experiment's template over its dataset; split into train and eval."""
    input:
        lambda w: dataset_tables(EXPERIMENTS[w.exp]["dataset"]),
    output:
        f"{R}/{{exp}}/prompts.parquet",
    params:
        seed=SEED,
        template=lambda w: EXPERIMENTS[w.exp]["prompt"],
        kind=lambda w: DATASETS[EXPERIMENTS[w.exp]["dataset"]]["kind"],
        eval_fraction=lambda w: DATASETS[EXPERIMENTS[w.exp]["dataset"]].get("eval_fraction", 0.25),
        caps=lambda w: " ".join(
            f"--{flag} {EXPERIMENTS[w.exp][key]}"
            for flag, key in (("max-train", "max_train_prompts"), ("max-eval", "max_eval_prompts"))
            if EXPERIMENTS[w.exp][key]
        ),
    log:
        f"{R}/logs/{{exp}}/make_prompts.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/make_prompts.py --experiment {wildcards.exp} --template {params.template}"
        " --dataset-kind {params.kind} --inputs {input} --out {output} --eval-fraction {params.eval_fraction}"
        " --seed {params.seed} {params.caps} > {log} 2>&1"
