# Meta-learning: FOMAML over MATH subjects under torchrun (FSDP2), and the adaptation evaluation.


rule train_fomaml:
    """First-order MAML over the MATH subjects, launched by torchrun (one process per GPU)."""
    input:
        model=lambda w: model_input(EXPERIMENTS[w.exp]["model"]),
        tasks=lambda w: f"{R}/data/{EXPERIMENTS[w.exp]['dataset']}_tasks",
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    params:
        seed=SEED,
        model=lambda w: model_dir(EXPERIMENTS[w.exp]["model"]),
        subjects=lambda w: " ".join(DATASETS[EXPERIMENTS[w.exp]["dataset"]]["subjects"]),
        meta=lambda w: as_json(EXPERIMENTS[w.exp]["meta"]),
        nproc=lambda w: EXPERIMENTS[w.exp]["meta"]["nproc"],
        shard_size=lambda w: EXPERIMENTS[w.exp]["meta"]["shard_size"],
        wandb=wandb_args,
    log:
        f"{R}/logs/{{exp}}/train.log",
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=lambda w: EXPERIMENTS[w.exp]["meta"]["nproc"] if config["platform"] == "slurm" else 0,
        nodes=1,
        cpus_per_task=2,
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m rlmeta.launch --nproc {params.nproc} --nodes {resources.nodes}"
        " --cpus-per-task {resources.cpus_per_task} --"
        " scripts/train_fomaml.py --model {params.model:q} --tasks-dir {input.tasks} --subjects {params.subjects}"
        " --meta-json {params.meta:q} --shard-size {params.shard_size} --seed {params.seed} --out {output.model}"
        " --metrics {output.metrics}"
        " {params.wandb} > {log} 2>&1"


rule eval_adaptation:
    """Adapt base and meta-learned initialisations on held-out problems of each subject; compare."""
    input:
        base=lambda w: model_input(EXPERIMENTS[w.exp]["model"]),
        meta=f"{R}/{{exp}}/checkpoints/final",
        tasks=lambda w: f"{R}/data/{EXPERIMENTS[w.exp]['dataset']}_tasks",
    output:
        f"{R}/{{exp}}/eval/summary.json",
    params:
        seed=SEED,
        base=lambda w: model_dir(EXPERIMENTS[w.exp]["model"]),
        subjects=lambda w: " ".join(DATASETS[EXPERIMENTS[w.exp]["dataset"]]["subjects"]),
        meta=lambda w: as_json(EXPERIMENTS[w.exp]["meta"]),
        max_new_tokens=lambda w: EXPERIMENTS[w.exp]["eval"]["max_new_tokens"] or 128,
    log:
        f"{R}/logs/{{exp}}/eval_adaptation.log",
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    conda:
        "../envs/torch.yaml"
    shell:
        "python scripts/eval_adaptation.py --base {params.base:q} --meta {input.meta} --tasks-dir {input.tasks}"
        " --subjects {params.subjects} --meta-json {params.meta:q} --seed {params.seed}"
        " --max-new-tokens {params.max_new_tokens} --out {output} > {log} 2>&1"
