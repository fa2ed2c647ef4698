# RL training: GSPO / GRPO on MLX (our trainer) and on torch (TRL GRPOTrainer + PEFT).


rule train_mlx:
    """Online GRPO/GSPO on MLX: rollouts, rewards, group advantages, clipped updates, checkpoints."""
    input:
        model=base_policy_input,
        prompts=f"{R}/{{exp}}/prompts.parquet",
        guard=mlx_guard,
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    log:
        f"{R}/logs/{{exp}}/train.log",
    benchmark:
        f"{R}/benchmarks/train_mlx/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(backend="mlx"),
    conda:
        "../envs/mlx.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        code=code_with_scorers("train-mlx", metrics=False),
        seed=SEED,
        model=base_policy_path,
        job=rl_job_json,
        out_dir=out_dir_of,
        wandb=wandb_json,
    shell:
        "rlmeta train-mlx --model {params.model:q} --prompts {input.prompts} --job {params.job:q}"
        " --out {params.out_dir} --metrics {output.metrics} --seed {params.seed} --wandb {params.wandb:q}"
        " > {log} 2>&1"


rule train_trl:
    """GRPO/GSPO with TRL's GRPOTrainer (LoRA via peft), metrics in the project's columns."""
    input:
        model=base_policy_input,
        prompts=f"{R}/{{exp}}/prompts.parquet",
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    log:
        f"{R}/logs/{{exp}}/train.log",
    benchmark:
        f"{R}/benchmarks/train_trl/{{exp}}.tsv"
    wildcard_constraints:
        exp=exps_where(backend="torch", algorithm=("grpo", "gspo")),
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=1,
    params:
        code=code_with_scorers("train-trl", metrics=False),
        seed=SEED,
        model=base_policy_path,
        job=rl_job_json,
        out_dir=out_dir_of,
        wandb=wandb_json,
    shell:
        "rlmeta train-trl --model {params.model:q} --prompts {input.prompts} --job {params.job:q}"
        " --out {params.out_dir} --metrics {output.metrics} --seed {params.seed} --wandb {params.wandb:q}"
        " > {log} 2>&1"
