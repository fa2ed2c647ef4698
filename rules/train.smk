# RL training: GSPO / GRPO on MLX (our trainer) and on torch (TRL GRPOTrainer + PEFT), one job per training
# seed, each in its own folder <exp>/seed<N>/ (see run_outputs in common.smk).


rule train_mlx:
    """Online GRPO/GSPO on MLX: rollouts, rewards, group advantages, clipped updates, checkpoints."""
    input:
        model=base_policy_input,
        prompts=f"{R}/{{exp}}/prompts.parquet",
        guard=mlx_guard,
    output:
        **run_outputs(),
    log:
        f"{R}/logs/{{exp}}/train_seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/train_mlx/{{exp}}/seed{{seed}}.tsv"
    wildcard_constraints:
        exp=exps_where(backend="mlx"),
        seed=r"\d+",
    conda:
        "../envs/mlx.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        code=code_with_scorers("train-mlx"),
        model=base_policy_path,
        job=rl_job_json,
        out_dir=out_dir_of,
        wandb=wandb_json,
    shell:
        "rlmeta train-mlx --model {params.model:q} --prompts {input.prompts} --job {params.job:q}"
        " --out {params.out_dir} --metrics {output.metrics} --eval-curve {output.curve} --rollouts {output.rollouts}"
        " --seed {wildcards.seed} --wandb {params.wandb:q} > {log} 2>&1"


rule train_trl:
    """GRPO/GSPO with TRL's GRPOTrainer (LoRA via peft), metrics in the project's columns; train.distributed.nproc
    processes under rlmeta launch (torchrun, srun + c10d over several nodes), one without torchrun."""
    input:
        model=base_policy_input,
        prompts=f"{R}/{{exp}}/prompts.parquet",
    output:
        **run_outputs(),
    log:
        f"{R}/logs/{{exp}}/train_seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/train_trl/{{exp}}/seed{{seed}}.tsv"
    wildcard_constraints:
        exp=exps_where(backend="torch", algorithm=("grpo", "gspo")),
        seed=r"\d+",
    conda:
        trl_conda_env
    threads: trl_threads
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=trl_gpus,
        nodes=1,
        cpus_per_task=1,
    params:
        code=code_with_scorers("train-trl"),
        model=base_policy_path,
        job=rl_job_json,
        nproc=trl_nproc,
        vllm=trl_vllm_args,
        out_dir=out_dir_of,
        wandb=wandb_json,
    shell:
        "rlmeta launch --nproc {params.nproc} --nodes {resources.nodes} --cpus-per-task {resources.cpus_per_task}"
        " --direct-if-one{params.vllm} -- train-trl --model {params.model:q} --prompts {input.prompts} --job {params.job:q}"
        " --out {params.out_dir} --metrics {output.metrics} --eval-curve {output.curve} --rollouts {output.rollouts}"
        " --seed {wildcards.seed} --wandb {params.wandb:q} > {log} 2>&1"
