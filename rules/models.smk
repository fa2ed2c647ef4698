# Models: the tiny locally built default, and the SFT warm start of an experiment's base policy.


rule build_model:
    """Train a byte-level BPE tokenizer on the bundled corpus and initialise a tiny Qwen3."""
    input:
        build_inputs,
    output:
        directory(f"{R}/models/{{model}}"),
    log:
        f"{R}/logs/build_model/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/build_model/{{model}}.tsv"
    wildcard_constraints:
        model=built_models(),
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_of("build-model"),
        seed=SEED,
        build=build_json,
        corpus=corpus_args,
    shell:
        "rlmeta build-model --build {params.build:q} --corpus {params.corpus} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule warmstart:
    """Supervised fine-tuning on reference completions so the base policy emits the format."""
    input:
        model=warmstart_model_input,
        prompts=warmstart_prompts,
    output:
        directory(f"{R}/warmstart/{{key}}"),
    log:
        f"{R}/logs/warmstart/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/warmstart/{{key}}.tsv"
    conda:
        warmstart_env
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=0,
    params:
        code=code_of("warmstart"),
        seed=SEED,
        model=warmstart_model,
        backend=warmstart_backend_of,
        settings=warmstart_json,
        chat_kwargs=warmstart_chat_kwargs_json,
    shell:
        "rlmeta warmstart --model {params.model:q} --prompts {input.prompts} --out {output}"
        " --settings {params.settings:q} --backend {params.backend} --seed {params.seed}"
        " --chat-template-kwargs {params.chat_kwargs:q} > {log} 2>&1"
