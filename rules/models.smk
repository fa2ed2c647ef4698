# Models: the tiny locally built default, and the SFT warm start of an experiment's base policy.


rule build_model:
    """Train a byte-level BPE tokenizer on the bundled corpus and initialise a tiny Qwen3."""
    input:
        corpus=lambda w: corpus_files() if MODELS[w.model]["build"]["tokenizer"] == "bpe" else [],
        qwen=lambda w: local_files("resources/qwen-tokenizer") if MODELS[w.model]["build"]["tokenizer"] == "qwen" else [],
    output:
        directory(f"{R}/models/{{model}}"),
    params:
        seed=SEED,
        build=lambda w: as_json(MODELS[w.model]["build"]),
    log:
        f"{R}/logs/build_model/{{model}}.log",
    wildcard_constraints:
        model="|".join(n for n, m in MODELS.items() if "build" in m) or "(?!x)x",
    threads: 2
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/torch.yaml"
    shell:
        "python scripts/build_model.py --build-json {params.build:q} --corpus {input.corpus} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule warmstart:
    """Supervised fine-tuning on reference completions so the base policy emits the format."""
    input:
        model=lambda w: model_input(EXPERIMENTS[warmstart_source(w.key)]["model"]),
        prompts=lambda w: f"{R}/{warmstart_source(w.key)}/prompts.parquet",
    output:
        directory(f"{R}/warmstart/{{key}}"),
    params:
        seed=SEED,
        model=lambda w: model_for_backend(EXPERIMENTS[warmstart_source(w.key)]["model"], warmstart_backend(warmstart_source(w.key))),
        backend=lambda w: warmstart_backend(warmstart_source(w.key)),
        ws=lambda w: EXPERIMENTS[warmstart_source(w.key)]["warmstart"],
    log:
        f"{R}/logs/warmstart/{{key}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    conda:
        lambda w: env_for(warmstart_source(w.key))
    shell:
        "python scripts/warmstart.py --model {params.model:q} --prompts {input.prompts} --out {output}"
        " --steps {params.ws[steps]} --batch-size {params.ws[batch_size]} --lr {params.ws[learning_rate]}"
        " --max-seq-len {params.ws[max_seq_len]} --seed {params.seed} --backend {params.backend} > {log} 2>&1"
