# Meta-learning: FOMAML over MATH subjects under torchrun (FSDP2), and the adaptation evaluation.


rule train_fomaml:
    """First-order MAML over the MATH subjects, launched by torchrun (one process per GPU)."""
    input:
        model=meta_base_input,
        tasks=tasks_dir,
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    log:
        f"{R}/logs/{{exp}}/train.log",
    benchmark:
        f"{R}/benchmarks/train_fomaml/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=meta_gpus,
        nodes=1,
        cpus_per_task=2,
    params:
        code=code_of("launch", "train-fomaml"),
        seed=SEED,
        model=meta_base_path,
        subjects=subjects,
        meta=meta_json,
        nproc=meta_nproc,
        wandb=wandb_json,
    shell:
        "rlmeta launch --nproc {params.nproc} --nodes {resources.nodes} --cpus-per-task {resources.cpus_per_task}"
        " -- train-fomaml --model {params.model:q} --tasks-dir {input.tasks} --subjects {params.subjects}"
        " --meta {params.meta:q} --seed {params.seed} --out {output.model} --metrics {output.metrics}"
        " --wandb {params.wandb:q} > {log} 2>&1"


rule eval_adaptation:
    """Adapt base and meta-learned initialisations on held-out problems of each subject; compare."""
    input:
        base=meta_base_input,
        meta=f"{R}/{{exp}}/checkpoints/final",
        tasks=tasks_dir,
        provenance=f"{R}/{{exp}}/provenance.json",
    output:
        f"{R}/{{exp}}/eval/summary.json",
    log:
        f"{R}/logs/{{exp}}/eval_adaptation.log",
    benchmark:
        f"{R}/benchmarks/eval_adaptation/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    params:
        code=code_with_scorers("eval-adaptation", rewards=False),
        seed=SEED,
        base=meta_base_path,
        subjects=subjects,
        meta=meta_json,
        max_new_tokens=eval_max_new_tokens,
    shell:
        "rlmeta eval-adaptation --base {params.base:q} --meta {input.meta} --tasks-dir {input.tasks}"
        " --subjects {params.subjects} --settings {params.meta:q} --seed {params.seed}"
        " --max-new-tokens {params.max_new_tokens} --provenance {input.provenance} --out {output} > {log} 2>&1"
