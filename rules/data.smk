# Raw data -> tables: RSS snapshots and headlines, GSM8K and MATH problems, MATH task splits.


rule fetch_rss:
    """Fetch one feed (http, https or file) and keep its raw XML as a snapshot."""
    input:
        lambda w: local_files(FEEDS[w.feed][1]),
    output:
        xml=f"{R}/data/rss/{{feed}}.xml",
        meta=f"{R}/data/rss/{{feed}}.json",
    params:
        feeds=lambda w: as_json({w.feed: FEEDS[w.feed][1]}),
        out_dir=lambda w, output: os.path.dirname(output.xml),
        timeout=lambda w: DATASETS[FEEDS[w.feed][0]]["timeout_s"],
        retries=lambda w: DATASETS[FEEDS[w.feed][0]]["retries"],
        user_agent=lambda w: DATASETS[FEEDS[w.feed][0]]["user_agent"],
    log:
        f"{R}/logs/fetch_rss/{{feed}}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/fetch_rss.py --feeds-json {params.feeds:q} --out-dir {params.out_dir}"
        " --timeout {params.timeout} --retries {params.retries} --user-agent {params.user_agent:q}"
        " > {log} 2>&1"


rule build_headlines:
    """Normalise the snapshots of one rss dataset into a deduplicated headlines table."""
    input:
        lambda w: expand(f"{R}/data/rss/{{feed}}.xml", feed=feeds_of(w.dataset)),
    output:
        f"{R}/data/{{dataset}}.parquet",
    params:
        feeds=lambda w: list(feeds_of(w.dataset)),
        snapshots=lambda w, input: os.path.dirname(input[0]),
    log:
        f"{R}/logs/build_headlines/{{dataset}}.log",
    wildcard_constraints:
        dataset=names_of_kind("rss"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/build_headlines.py --snapshots {params.snapshots} --feeds {params.feeds} --out {output} > {log} 2>&1"


rule prepare_gsm8k:
    """GSM8K (hub id or local jsonl/parquet) -> problems tables with parsed final answers."""
    input:
        lambda w: local_files(DATASETS[w.dataset]["source"]),
    output:
        train=f"{R}/data/{{dataset}}/train.parquet",
        test=f"{R}/data/{{dataset}}/test.parquet",
    params:
        source=lambda w: DATASETS[w.dataset]["source"],
        out_dir=lambda w, output: os.path.dirname(output.train),
        caps=lambda w: cap_args(DATASETS[w.dataset]),
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    wildcard_constraints:
        dataset=names_of_kind("gsm8k"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/prepare_gsm8k.py --source {params.source:q} --out-dir {params.out_dir}"
        " {params.caps} > {log} 2>&1"


rule prepare_math:
    """MATH (hub id or local jsonl/parquet) -> problems tables with boxed answers, subject, level."""
    input:
        lambda w: local_files(DATASETS[w.dataset]["source"]),
    output:
        train=f"{R}/data/{{dataset}}/train.parquet",
        test=f"{R}/data/{{dataset}}/test.parquet",
    params:
        source=lambda w: DATASETS[w.dataset]["source"],
        out_dir=lambda w, output: os.path.dirname(output.train),
        caps=lambda w: cap_args(DATASETS[w.dataset]),
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    wildcard_constraints:
        dataset=names_of_kind("math"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/prepare_math.py --source {params.source:q} --out-dir {params.out_dir}"
        " {params.caps} > {log} 2>&1"


rule split_math_tasks:
    """Per-subject support / query / held-out splits of the MATH train rows (the FOMAML tasks)."""
    input:
        f"{R}/data/{{dataset}}/train.parquet",
    output:
        directory(f"{R}/data/{{dataset}}_tasks"),
    params:
        seed=SEED,
        subjects=lambda w: " ".join(DATASETS[w.dataset]["subjects"]),
        support=lambda w: DATASETS[w.dataset]["support_ratio"],
        query=lambda w: DATASETS[w.dataset]["query_ratio"],
    log:
        f"{R}/logs/split_math_tasks/{{dataset}}.log",
    wildcard_constraints:
        dataset=names_of_kind("math"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/core.yaml"
    shell:
        "python scripts/split_math_tasks.py --train {input} --subjects {params.subjects}"
        " --support-ratio {params.support} --query-ratio {params.query} --seed {params.seed}"
        " --out-dir {output} > {log} 2>&1"
