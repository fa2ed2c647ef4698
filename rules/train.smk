# RL training: GSPO / GRPO on MLX (our trainer) and on torch (TRL GRPOTrainer + PEFT).


rule train_mlx:
    """Online GRPO/GSPO on MLX: rollouts, rewards, group advantages, clipped updates, checkpoints."""
    input:
        model=lambda w: base_policy_input(w.exp),
        prompts=f"{R}/{{exp}}/prompts.parquet",
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    params:
        seed=SEED,
        model=lambda w: base_policy(w.exp),
        spec=lambda w: as_json(train_spec(w.exp)),
        out_dir=lambda w, output: os.path.dirname(output.model),
        check=lambda w: check_platform(w.exp),
        wandb=wandb_args,
    log:
        f"{R}/logs/{{exp}}/train.log",
    wildcard_constraints:
        exp=exps_where(backend="mlx"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    conda:
        "../envs/mlx.yaml"
    shell:
        "python scripts/train_mlx.py --model {params.model:q} --prompts {input.prompts} --experiment-json {params.spec:q}"
        " --out {params.out_dir} --metrics {output.metrics} --seed {params.seed} {params.wandb} > {log} 2>&1"


rule train_trl:
    """GRPO/GSPO with TRL's GRPOTrainer (LoRA via peft), metrics in the project's columns."""
    input:
        model=lambda w: base_policy_input(w.exp),
        prompts=f"{R}/{{exp}}/prompts.parquet",
    output:
        model=directory(f"{R}/{{exp}}/checkpoints/final"),
        metrics=f"{R}/{{exp}}/train_metrics.parquet",
    params:
        seed=SEED,
        model=lambda w: base_policy(w.exp),
        spec=lambda w: as_json(train_spec(w.exp)),
        out_dir=lambda w, output: os.path.dirname(output.model),
        wandb=wandb_args,
    log:
        f"{R}/logs/{{exp}}/train.log",
    wildcard_constraints:
        exp=exps_where(backend="torch", algorithm=("grpo", "gspo")),
    threads: 1
    resources:
        mem_mb=16000,
        runtime=480,
        gpu=1,
    conda:
        "../envs/torch.yaml"
    shell:
        "python scripts/train_trl.py --model {params.model:q} --prompts {input.prompts} --experiment-json {params.spec:q}"
        " --out {params.out_dir} --metrics {output.metrics} --seed {params.seed} {params.wandb} > {log} 2>&1"
