# Raw data -> tables: RSS snapshots and headlines, GSM8K, MATH and reasoning-gym problems, MATH task splits.


rule fetch_rss:
    """Fetch one feed (http, https or file) and keep its raw XML as a snapshot."""
    input:
        feed_files,
    output:
        xml=f"{R}/data/rss/{{feed}}.xml",
        meta=f"{R}/data/rss/{{feed}}.json",
    log:
        f"{R}/logs/fetch_rss/{{feed}}.log",
    benchmark:
        f"{R}/benchmarks/fetch_rss/{{feed}}.tsv"
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    params:
        code=code_of("fetch-rss"),
        dataset=feed_json,
        out_dir=out_dir_of,
    shell:
        "rlmeta fetch-rss --dataset {params.dataset:q} --out-dir {params.out_dir} > {log} 2>&1"


rule build_headlines:
    """Normalise the snapshots of one rss dataset into a deduplicated headlines table."""
    input:
        feed_snapshots,
    output:
        f"{R}/data/{{dataset}}.parquet",
    log:
        f"{R}/logs/build_headlines/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/build_headlines/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=names_of_kind("rss"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_of("build-headlines"),
        feeds=dataset_feeds,
        snapshots=input_dir_of,
    shell:
        "rlmeta build-headlines --snapshots {params.snapshots} --feeds {params.feeds} --out {output}" " > {log} 2>&1"


rule prepare_gsm8k:
    """GSM8K (hub id or local jsonl/parquet) -> problems tables with parsed final answers."""
    input:
        source_files,
    output:
        train=f"{R}/data/{{dataset}}/train.parquet",
        test=f"{R}/data/{{dataset}}/test.parquet",
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_gsm8k/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=names_of_kind("gsm8k"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_of("prepare-gsm8k"),
        source=lookup(dpath="datasets/{dataset}/source", within=config),
        caps=cap_args,
        out_dir=out_dir_of,
    shell:
        "rlmeta prepare-gsm8k --source {params.source:q} --out-dir {params.out_dir} {params.caps} > {log} 2>&1"


rule prepare_math:
    """MATH (hub id or local jsonl/parquet) -> problems tables with boxed answers, subject, level."""
    input:
        source_files,
    output:
        train=f"{R}/data/{{dataset}}/train.parquet",
        test=f"{R}/data/{{dataset}}/test.parquet",
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_math/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=names_of_kind("math"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        code=code_of("prepare-math"),
        source=lookup(dpath="datasets/{dataset}/source", within=config),
        caps=cap_args,
        out_dir=out_dir_of,
    shell:
        "rlmeta prepare-math --source {params.source:q} --out-dir {params.out_dir} {params.caps} > {log} 2>&1"


rule prepare_reasoning_gym:
    """reasoning-gym generators (tasks and parameters from config) -> problems tables, seeded."""
    output:
        train=f"{R}/data/{{dataset}}/train.parquet",
        test=f"{R}/data/{{dataset}}/test.parquet",
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_reasoning_gym/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=names_of_kind("reasoning_gym"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_of("prepare-reasoning-gym"),
        dataset=dataset_json,
        seed=SEED,
        out_dir=out_dir_of,
    shell:
        "rlmeta prepare-reasoning-gym --dataset {params.dataset:q} --seed {params.seed}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule split_math_tasks:
    """Per-subject support / query / held-out splits of the MATH train rows (the FOMAML tasks)."""
    input:
        f"{R}/data/{{dataset}}/train.parquet",
    output:
        directory(f"{R}/data/{{dataset}}_tasks"),
    log:
        f"{R}/logs/split_math_tasks/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/split_math_tasks/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=names_of_kind("math"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_of("split-math-tasks"),
        seed=SEED,
        subjects=dataset_subjects,
        support=lookup(dpath="datasets/{dataset}/support_ratio", within=config),
        query=lookup(dpath="datasets/{dataset}/query_ratio", within=config),
    shell:
        "rlmeta split-math-tasks --train {input} --subjects {params.subjects}"
        " --support-ratio {params.support} --query-ratio {params.query} --seed {params.seed}"
        " --out-dir {output} > {log} 2>&1"
