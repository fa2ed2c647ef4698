# Meta-learning: FOMAML / Reptile / multi-task over the MATH training subjects under torchrun (FSDP2), the
# baselines trained at the same budget, and the adaptation evaluation on held-out subjects.


rule train_fomaml:
    """The experiment's method (meta.method: fomaml, reptile or multitask) over the training subjects, launched
    by torchrun (one process per GPU)."""
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
    # first when both cores are free: run last (as without a priority) these two-thread jobs and the one-thread
    # evaluation after them held the machine alone for about 100 s at the end of `make run`
    priority: 1
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
        subjects=meta_train_subjects,
        meta=meta_train_json,
        nproc=meta_nproc,
        wandb=wandb_json,
    shell:
        "rlmeta launch --nproc {params.nproc} --nodes {resources.nodes} --cpus-per-task {resources.cpus_per_task}"
        " -- train-fomaml --model {params.model:q} --tasks-dir {input.tasks} --subjects {params.subjects}"
        " --meta {params.meta:q} --seed {params.seed} --out {output.model} --metrics {output.metrics}"
        " --wandb {params.wandb:q} > {log} 2>&1"


rule train_meta_baseline:
    """A baseline method of meta.baselines, trained with the experiment's settings and budget (same batches,
    gradient passes and tokens) into <exp>/baselines/<method>/."""
    input:
        model=meta_base_input,
        tasks=tasks_dir,
    output:
        model=directory(f"{R}/{{exp}}/baselines/{{method}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/baselines/{{method}}/train_metrics.parquet",
    log:
        f"{R}/logs/{{exp}}/train_{{method}}.log",
    benchmark:
        f"{R}/benchmarks/train_meta_baseline/{{exp}}/{{method}}.tsv"
    wildcard_constraints:
        exp=exps_where(algorithm="fomaml"),
        method=META_METHODS,
    # first when both cores are free: run last (as without a priority) these two-thread jobs and the one-thread
    # evaluation after them held the machine alone for about 100 s at the end of `make run`
    priority: 1
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
        subjects=meta_train_subjects,
        meta=meta_baseline_json,
        nproc=meta_nproc,
        wandb=wandb_json,
    shell:
        "rlmeta launch --nproc {params.nproc} --nodes {resources.nodes} --cpus-per-task {resources.cpus_per_task}"
        " -- train-fomaml --model {params.model:q} --tasks-dir {input.tasks} --subjects {params.subjects}"
        " --meta {params.meta:q} --seed {params.seed} --out {output.model} --metrics {output.metrics}"
        " --wandb {params.wandb:q} > {log} 2>&1"


rule eval_adaptation:
    """Adaptation episodes on the held-out subjects (and held-out rows of the training subjects) from the base
    initialisation and every trained method; intervals over episodes, paired differences, curves."""
    input:
        base=meta_base_input,
        trained=meta_trained_inputs,
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
    # one thread: 49.8 s vs 65.6 s with two on this machine (small products; the same summary), and the other
    # core runs another job meanwhile
    priority: 1
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    params:
        code=code_with_scorers("eval-adaptation", rewards=False),
        seed=SEED,
        base=meta_base_path,
        subjects=meta_train_subjects,
        meta=meta_json,
        trained=meta_trained_args,
        max_new_tokens=eval_max_new_tokens,
        bootstrap=meta_bootstrap,
    shell:
        "rlmeta eval-adaptation --base {params.base:q} {params.trained} --tasks-dir {input.tasks}"
        " --subjects {params.subjects} --settings {params.meta:q} --seed {params.seed}"
        " --max-new-tokens {params.max_new_tokens} --bootstrap {params.bootstrap} --provenance {input.provenance}"
        " --out {output} > {log} 2>&1"
