# Provenance: what produced an experiment's result (code, environment, inputs, models, job times).


rule provenance:
    """Git state, environment, the training job's record, input and model hashes and every job's wall time."""
    input:
        benchmarks=provenance_benchmarks,
        data=provenance_data,
        models=provenance_model_inputs,
    output:
        f"{R}/{{exp}}/provenance.json",
    log:
        f"{R}/logs/{{exp}}/provenance.log",
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_of("provenance"),
        seed=SEED,
        config=experiment_json,
        models=provenance_models,
    shell:
        "rlmeta provenance --experiment {wildcards.exp} --config {params.config:q} --seed {params.seed}"
        " --inputs {input.data} {params.models} --benchmarks {input.benchmarks} --out {output} > {log} 2>&1"
