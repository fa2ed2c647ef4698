# Validated settings, paths and every computed value the rules use, as named functions.
import hashlib
import os
import re
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # a Snakemake outside the project's venv
from rlmeta.cli import REWARD_MODULES_ENV  # noqa: E402
from rlmeta.errors import UserError  # noqa: E402
from rlmeta.prompts import TEMPLATES  # noqa: E402
from rlmeta.provenance import code_fingerprint, reward_modules, step_module  # noqa: E402
from rlmeta.rewards import resolve_spec  # noqa: E402
from rlmeta.settings import startup_checks, validate  # noqa: E402

try:
    CFG = validate(config, workflow.basedir)  # the one validation (rlmeta.settings); loads the reward modules
    startup_checks(CFG, workflow.basedir)
except UserError as err:
    sys.exit(str(err))
config.clear()
config.update(CFG.model_dump(mode="json"))

R = CFG.results
EXPERIMENTS = CFG.experiments
DATASETS = CFG.datasets
MODELS = CFG.models
SEED = CFG.seed
CHOSEN = CFG.chosen()


def reward_modules_export():
    """`export RLMETA_REWARD_MODULES=...; ` for the shell prefix (files as absolute paths), or nothing."""
    specs = [resolve_spec(s, workflow.basedir) for s in CFG.reward_modules]
    return f"export {REWARD_MODULES_ENV}={shlex.quote(os.pathsep.join(specs))}; " if specs else ""


# Each job runs `rlmeta <step>`, a shell function for the interpreter that runs Snakemake (so
# .venv/bin/snakemake works without activating the venv), or inside a conda environment (which holds
# only the dependencies) the python of that environment, with src/ on PYTHONPATH. The config's
# reward_modules reach every step as $RLMETA_REWARD_MODULES (the default of --reward-modules; why one
# variable and not a param per rule: see rlmeta.cli). OpenMP threads wait passively unless the user sets
# OMP_WAIT_POLICY: jobs run side by side on shared cores, and threads that spin while they wait (libgomp's
# default) make a torch job that shares its cores many times slower (figures in docs/benchmarks.md).
PY = (
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else shlex.quote(sys.executable)
)
shell.prefix(
    "set -euo pipefail; "
    f"export PYTHONPATH={shlex.quote(str(Path(workflow.basedir) / 'src'))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f'rlmeta() {{{{ {PY} -m rlmeta "$@"; }}}}; '
    "export OMP_WAIT_POLICY=${{OMP_WAIT_POLICY:-PASSIVE}}; "
    f"{reward_modules_export()}"
)


def as_json(obj):
    """JSON for a shell argument (quote it with the :q format spec)."""
    return json.dumps(obj, sort_keys=True)


def exp_of(wildcards):
    return EXPERIMENTS[wildcards.exp]


# -- wildcard constraints ------------------------------------------------------------------


def names_of_kind(kind):
    """Regex alternation of the dataset names of one kind (matches nothing when none)."""
    names = [n for n, d in DATASETS.items() if d.kind == kind]
    return "|".join(names) if names else "(?!x)x"


def exps_where(**conditions):
    """Regex alternation of experiment names whose fields equal (or are in) ``conditions``."""

    def ok(e):
        return all(
            getattr(e, k) in v if isinstance(v, (tuple, list)) else getattr(e, k) == v for k, v in conditions.items()
        )

    names = [n for n, e in EXPERIMENTS.items() if ok(e)]
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) if names else "(?!x)x"


def built_models():
    return "|".join(n for n, m in MODELS.items() if m.build is not None) or "(?!x)x"


# -- data --------------------------------------------------------------------------------------


def local_files(source):
    """Files under a local source (so edits re-run the step); [] for hub ids and URLs."""
    if source.startswith(("http://", "https://")):
        return []
    p = Path(source.removeprefix("file://"))
    if not p.exists():
        return []
    return sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [str(p)]


def all_feeds():
    """Feed name -> (dataset, url) over every rss dataset (names are unique: checked in settings)."""
    return {feed: (ds, url) for ds, d in DATASETS.items() if d.kind == "rss" for feed, url in d.feeds.items()}


FEEDS = all_feeds()


def feed_files(wildcards):
    return local_files(FEEDS[wildcards.feed][1])


def feed_json(wildcards):
    """The feed's rss dataset block, restricted to this feed (another feed's change does not re-fetch it)."""
    ds, url = FEEDS[wildcards.feed]
    return as_json(DATASETS[ds].model_dump(mode="json") | {"feeds": {wildcards.feed: url}})


def feed_snapshots(wildcards):
    return expand(f"{R}/data/rss/{{feed}}.xml", feed=list(DATASETS[wildcards.dataset].feeds))


def dataset_feeds(wildcards):
    return " ".join(DATASETS[wildcards.dataset].feeds)


def dataset_subjects(wildcards):
    return " ".join(DATASETS[wildcards.dataset].subjects)


def source_files(wildcards):
    return local_files(DATASETS[wildcards.dataset].source)


def dataset_json(wildcards):
    """A dataset block as JSON (reasoning_gym: its tasks, sizes and seed)."""
    return as_json(DATASETS[wildcards.dataset].model_dump(mode="json"))


def cap_args(wildcards):
    """--max-train/--max-test flags of a dataset block (omitted when null)."""
    ds = DATASETS[wildcards.dataset]
    return " ".join(f"--{k.replace('_', '-')} {getattr(ds, k)}" for k in ("max_train", "max_test") if getattr(ds, k))


def dataset_tables(wildcards):
    """The prepared tables of an experiment's dataset, as make_prompts reads them."""
    name = exp_of(wildcards).dataset
    if DATASETS[name].kind == "rss":
        return [f"{R}/data/{name}.parquet"]
    return [f"{R}/data/{name}/train.parquet", f"{R}/data/{name}/test.parquet"]


def prompt_caps(wildcards):
    e = exp_of(wildcards)
    return " ".join(
        f"--{flag} {getattr(e, key)}"
        for flag, key in (
            ("max-train", "max_train_prompts"),
            ("max-eval", "max_eval_prompts"),
        )
        if getattr(e, key)
    )


def eval_fraction(wildcards):
    ds = DATASETS[exp_of(wildcards).dataset]
    return getattr(ds, "eval_fraction", 0.25)


def tasks_dir(wildcards):
    return f"{R}/data/{exp_of(wildcards).dataset}_tasks"


def subjects(wildcards):
    return " ".join(DATASETS[exp_of(wildcards).dataset].subjects)


# -- models and policies -----------------------------------------------------------------------


def corpus_files():
    """Bundled text the BPE tokenizer is trained on."""
    base = Path(workflow.basedir) / "resources"
    files = [f for sub in ("rss", "gsm8k", "math") for f in sorted((base / sub).glob("*")) if f.is_file()]
    return [str(f.relative_to(workflow.basedir)) for f in files]


def build_inputs(wildcards):
    build = MODELS[wildcards.model].build
    if build.tokenizer == "bpe":
        return corpus_files()
    return local_files("resources/qwen-tokenizer")


def corpus_args(wildcards, input):
    """The build's corpus files (bpe only; a qwen build reads its vendored tokenizer)."""
    return " ".join(input) if MODELS[wildcards.model].build.tokenizer == "bpe" else ""


def build_json(wildcards):
    return as_json(MODELS[wildcards.model].build.model_dump(mode="json"))


def model_path(model, backend):
    """Local folder of a built model, or the hub id / path of a real one."""
    m = MODELS[model]
    return f"{R}/models/{model}" if m.build is not None else m.source(backend)


def model_input(model):
    """Snakemake input for a model: the built folder, or nothing for a hub model."""
    return [f"{R}/models/{model}"] if MODELS[model].build is not None else []


def warmstart_backend(name):
    e = EXPERIMENTS[name]
    return e.warmstart.backend or e.backend


def warmstart_chat_kwargs(name):
    """The chat template kwargs of an experiment's prompts (train.chat_template_kwargs; FOMAML: none)."""
    e = EXPERIMENTS[name]
    return dict(e.train.chat_template_kwargs) if e.train is not None else {}


def warmstart_key(name):
    """Folder name of the warm start an experiment uses: experiments with the same model, dataset,
    prompt, train-prompt cap, chat template kwargs and warm-start settings share one
    (``<model>_<prompt>_<hash8>``)."""
    e = EXPERIMENTS[name]
    sig = [
        e.model,
        e.dataset,
        e.prompt,
        e.max_train_prompts,
        e.warmstart.model_dump(mode="json"),
        warmstart_backend(name),
    ]
    if warmstart_chat_kwargs(name):  # only when set: existing warm starts keep their folder
        sig.append(warmstart_chat_kwargs(name))
    sig = as_json(sig)
    return f"{e.model}_{e.prompt}_{hashlib.sha256(sig.encode()).hexdigest()[:8]}"


def warmstart_source(wildcards):
    """The experiment whose prompts a shared warm start reads: a named experiment before sweep points."""
    owners = [n for n in EXPERIMENTS if warmstart_key(n) == wildcards.key]
    return min(owners, key=lambda n: ("__" in n, n))


def warmstart_model_input(wildcards):
    return model_input(EXPERIMENTS[warmstart_source(wildcards)].model)


def warmstart_prompts(wildcards):
    return f"{R}/{warmstart_source(wildcards)}/prompts.parquet"


def warmstart_model(wildcards):
    src = warmstart_source(wildcards)
    return model_path(EXPERIMENTS[src].model, warmstart_backend(src))


def warmstart_backend_of(wildcards):
    return warmstart_backend(warmstart_source(wildcards))


def warmstart_json(wildcards):
    return as_json(EXPERIMENTS[warmstart_source(wildcards)].warmstart.model_dump(mode="json"))


def warmstart_chat_kwargs_json(wildcards):
    return as_json(warmstart_chat_kwargs(warmstart_source(wildcards)))


def base_policy(name):
    """The RL starting point: the (shared) warm-started checkpoint when warmstart.steps > 0."""
    e = EXPERIMENTS[name]
    if e.warmstart.steps > 0:
        return f"{R}/warmstart/{warmstart_key(name)}"
    return model_path(e.model, e.backend)


def base_policy_input(wildcards):
    e = exp_of(wildcards)
    if e.warmstart.steps > 0:
        return [f"{R}/warmstart/{warmstart_key(wildcards.exp)}"]
    return model_input(e.model)


def base_policy_path(wildcards):
    return base_policy(wildcards.exp)


def meta_base_input(wildcards):
    return model_input(exp_of(wildcards).model)


def meta_base_path(wildcards):
    return model_path(exp_of(wildcards).model, "torch")


# -- training runs: one per seed, each in <exp>/seed<N>/ ------------------------------------------

RUN_FILES = {
    "checkpoint": "checkpoints/final",
    "metrics": "train_metrics.parquet",
    "curve": "eval_curve.parquet",
    "rollouts": "rollouts",
}
"""What a training run writes, relative to its folder results/<exp>/seed<N>/."""


def run_outputs():
    """The outputs of a training job (exp and seed wildcards)."""
    d = f"{R}/{{exp}}/seed{{seed}}"
    return dict(
        model=directory(f"{d}/{RUN_FILES['checkpoint']}"),
        metrics=f"{d}/{RUN_FILES['metrics']}",
        curve=f"{d}/{RUN_FILES['curve']}",
        rollouts=directory(f"{d}/{RUN_FILES['rollouts']}"),
    )


def seeds_of(name):
    """An RL experiment's training seeds."""
    return EXPERIMENTS[name].run_seeds(SEED)


def run_file(name, seed, kind):
    """A file of one training run: its checkpoint, metrics, eval curve or rollouts, or its held-out
    responses/rewards (kept with the base policy's in <exp>/responses/, <exp>/rewards/)."""
    if kind in ("responses", "rewards"):
        return f"{R}/{name}/{kind}/seed{seed}.parquet"
    return f"{R}/{name}/seed{seed}/{RUN_FILES[kind]}"


def run_tables(*kinds):
    """Input function: those files of every training run of the experiment."""

    def files(wildcards):
        return [run_file(wildcards.exp, s, k) for s in seeds_of(wildcards.exp) for k in kinds]

    return files


def run_args(*kinds):
    """Params function: `--run seed<N> FILE...` per training run, the files in the order of ``kinds``."""

    def args(wildcards):
        runs = [[f"seed{s}", *(run_file(wildcards.exp, s, k) for k in kinds)] for s in seeds_of(wildcards.exp)]
        return " ".join("--run " + " ".join(shlex.quote(x) for x in run) for run in runs)

    return args


def policy_input(wildcards):
    if wildcards.policy == "base":
        return base_policy_input(wildcards)
    return [run_file(wildcards.exp, wildcards.policy.removeprefix("seed"), "checkpoint")]


def policy_path(wildcards):
    if wildcards.policy == "base":
        return base_policy(wildcards.exp)
    return run_file(wildcards.exp, wildcards.policy.removeprefix("seed"), "checkpoint")


def backend_of(wildcards):
    return exp_of(wildcards).backend


def mlx_guard(wildcards):
    """No inputs; refuses an MLX experiment under the slurm profile (MLX never goes to Linux GPU nodes)."""
    if CFG.platform == "slurm" and exp_of(wildcards).backend == "mlx":
        raise WorkflowError(
            f"experiment '{wildcards.exp}' uses backend mlx, which runs on Apple Silicon (or CPU only): "
            "run it with --profile profiles/apple-silicon or profiles/default, or set its backend to torch"
        )
    return []


def env_for(wildcards):
    """Conda environment of an experiment's backend (used with --software-deployment-method conda)."""
    return f"../envs/{exp_of(wildcards).backend}.yaml"


def warmstart_env(wildcards):
    return f"../envs/{warmstart_backend_of(wildcards)}.yaml"


# -- settings blocks passed to the steps (a change re-runs exactly the steps that read them) ---


def rl_job_json(wildcards):
    """What training depends on (eval changes do not retrain)."""
    return as_json(exp_of(wildcards).rl_job().model_dump(mode="json"))


def meta_json(wildcards):
    return as_json(exp_of(wildcards).meta.model_dump(mode="json"))


def sampling_json(wildcards):
    return as_json(exp_of(wildcards).sampling(SEED).model_dump(mode="json"))


def eval_max_new_tokens(wildcards):
    return exp_of(wildcards).sampling(SEED).max_new_tokens


def rewards_json(wildcards):
    e = exp_of(wildcards)
    return as_json({"rewards": e.reward_weights, "reward_params": e.reward_params})


def template_of(wildcards):
    return exp_of(wildcards).prompt


def experiment_json(wildcards):
    return as_json(exp_of(wildcards).model_dump(mode="json"))


def trl_nproc(wildcards):
    """Processes of a TRL run (train.distributed.nproc): GPUs under the slurm profile, CPU processes elsewhere."""
    return exp_of(wildcards).rl_job().train.distributed.nproc


def trl_vllm_server(wildcards):
    """train.trl.vllm in server mode (else None)."""
    v = exp_of(wildcards).rl_job().train.trl.vllm
    return v if v is not None and v.mode == "server" else None


def trl_conda_env(wildcards):
    """The train_trl environment (--sdm conda): torch's, or torch's with vLLM when train.trl.vllm is set."""
    vllm = exp_of(wildcards).rl_job().train.trl.vllm is not None
    return "../envs/vllm.yaml" if vllm else "../envs/torch.yaml"


def trl_gpus(wildcards):
    """GPUs of a TRL job under the slurm profile: train.distributed.nproc, plus vLLM's server GPUs in server
    mode; none elsewhere."""
    server = trl_vllm_server(wildcards)
    return trl_nproc(wildcards) + (server.server_gpus if server else 0) if CFG.platform == "slurm" else 0


def trl_vllm_args(wildcards):
    """rlmeta launch's options (with a leading space) that start TRL's vLLM server in the job (server mode),
    else none."""
    v = trl_vllm_server(wildcards)
    if v is None:
        return ""
    args = (
        f" --vllm-serve-gpus {v.server_gpus} --vllm-model {shlex.quote(base_policy_path(wildcards))} "
        f"--vllm-tensor-parallel {v.tensor_parallel_size} --vllm-port {v.port}"
    )
    return args + (f" --vllm-max-model-len {v.max_model_length}" if v.max_model_length else "")


def trl_threads(wildcards):
    """Cores a TRL job holds on this machine: one per process (torchrun gives each OMP_NUM_THREADS=1)."""
    return 1 if CFG.platform == "slurm" else trl_nproc(wildcards)


def meta_nproc(wildcards):
    return exp_of(wildcards).meta.nproc


def meta_gpus(wildcards):
    """GPUs of a FOMAML job: meta.nproc under the slurm profile, none elsewhere."""
    return exp_of(wildcards).meta.nproc if CFG.platform == "slurm" else 0


META_METHODS = "fomaml|reptile|multitask"
"""The meta.method values (the baselines' wildcard)."""


def meta_train_subjects(wildcards):
    """The subjects a meta-learning experiment trains on: its dataset's, less meta.test_subjects."""
    e = exp_of(wildcards)
    return " ".join(s for s in DATASETS[e.dataset].subjects if s not in e.meta.test_subjects)


def _meta_train(e, **changes):
    """The meta block as training reads it: the evaluation-only keys left out, so changing them retrains nothing."""
    from rlmeta.settings import META_EVAL_KEYS

    return as_json({**e.meta.model_dump(mode="json", exclude=set(META_EVAL_KEYS)), **changes})


def meta_train_json(wildcards):
    return _meta_train(exp_of(wildcards))


def meta_baseline_json(wildcards):
    """A baseline's meta block: the experiment's settings and budget with meta.method = the baseline."""
    e = exp_of(wildcards)
    if wildcards.method not in e.meta.baselines:
        raise ValueError(f"{wildcards.method} is not in experiments.{wildcards.exp}.meta.baselines")
    return _meta_train(e, method=wildcards.method)


def meta_checkpoints(name):
    """Method -> (final checkpoint, train_metrics) of a meta-learning experiment: its method, then its baselines."""
    m = EXPERIMENTS[name].meta
    out = {m.method: (f"{R}/{name}/checkpoints/final", f"{R}/{name}/train_metrics.parquet")}
    for b in m.baselines:
        d = f"{R}/{name}/baselines/{b}"
        out[b] = (f"{d}/checkpoints/final", f"{d}/train_metrics.parquet")
    return out


def meta_trained_inputs(wildcards):
    return [p for pair in meta_checkpoints(wildcards.exp).values() for p in pair]


def meta_trained_args(wildcards):
    """`--trained METHOD CHECKPOINT METRICS` of every trained method."""
    return " ".join(
        f"--trained {m} {shlex.quote(ck)} {shlex.quote(mt)}" for m, (ck, mt) in meta_checkpoints(wildcards.exp).items()
    )


def meta_bootstrap(wildcards):
    return exp_of(wildcards).eval.bootstrap


def wandb_json(wildcards=None, input=None):
    """W&B settings; a derived param (a function of input), so a mode change does not retrain."""
    return as_json(CFG.wandb.model_dump(mode="json"))


def out_dir_of(wildcards, output):
    return os.path.dirname(output[0])


def input_dir_of(wildcards, input):
    return os.path.dirname(input[0])


# -- code and provenance ---------------------------------------------------------------------


def code_of(*steps):
    """A rule's `code` param: every rlmeta module its steps import, with a hash of its source, so that
    editing one re-runs exactly the rules that run it (rlmeta.provenance). Not used by the command."""
    return code_fingerprint([step_module(s) for s in steps])


def scorers_of(wildcards, rewards=True, metrics=True):
    """The registered scorers an experiment's jobs call: its rewards and its template's task metrics."""
    e = exp_of(wildcards)
    return (list(e.reward_weights) if rewards else []) + (list(TEMPLATES[e.prompt].metrics.values()) if metrics else [])


def code_with_scorers(step, rewards=True, metrics=True):
    """code_of(step) plus the modules of the scorers the experiment uses (rlmeta.provenance leaves the reward
    functions out of every import graph), so editing a reward re-runs only the jobs of experiments using it."""

    def code(wildcards):
        used = scorers_of(wildcards, rewards, metrics)
        return code_fingerprint([step_module(step), *reward_modules(used)])

    return code


def data_jobs(name):
    """Benchmark files of the jobs that prepare a dataset."""
    ds = DATASETS[name]
    if ds.kind == "rss":
        return [f"{R}/benchmarks/fetch_rss/{f}.tsv" for f in ds.feeds] + [f"{R}/benchmarks/build_headlines/{name}.tsv"]
    jobs = [f"{R}/benchmarks/prepare_{ds.kind}/{name}.tsv"]
    return jobs + ([f"{R}/benchmarks/split_math_tasks/{name}.tsv"] if ds.kind == "math" else [])


def provenance_benchmarks(wildcards):
    """Benchmark files (wall time, memory) of every job an experiment's result depends on."""
    name, e = wildcards.exp, exp_of(wildcards)
    jobs = data_jobs(e.dataset)
    if MODELS[e.model].build is not None:
        jobs.append(f"{R}/benchmarks/build_model/{e.model}.tsv")
    if e.algorithm == "fomaml":
        return (
            jobs
            + [f"{R}/benchmarks/train_fomaml/{name}.tsv"]
            + [f"{R}/benchmarks/train_meta_baseline/{name}/{b}.tsv" for b in e.meta.baselines]
        )
    if e.warmstart.steps > 0:
        jobs.append(f"{R}/benchmarks/warmstart/{warmstart_key(name)}.tsv")
    train = "train_mlx" if e.backend == "mlx" else "train_trl"
    seeds = seeds_of(name)
    jobs += [f"{R}/benchmarks/make_prompts/{name}.tsv"] + [f"{R}/benchmarks/{train}/{name}/seed{s}.tsv" for s in seeds]
    return jobs + [
        f"{R}/benchmarks/{rule}/{name}/{pol}.tsv"
        for rule in ("generate", "score")
        for pol in ["base", *(f"seed{s}" for s in seeds)]
    ]


def provenance_data(wildcards):
    """The data an experiment's result was computed from (hashed into provenance.json)."""
    name, e = wildcards.exp, exp_of(wildcards)
    ds = DATASETS[e.dataset]
    if ds.kind == "reasoning_gym":  # generated: the tables themselves
        sources = [f"{R}/data/{e.dataset}/{split}.parquet" for split in ("train", "test")]
    elif ds.kind == "rss":
        sources = [f for url in ds.feeds.values() for f in local_files(url)]
    else:
        sources = local_files(ds.source)
    if e.algorithm == "fomaml":
        return sources + [f"{R}/data/{e.dataset}_tasks"]
    pols = ["base", *(f"seed{s}" for s in seeds_of(name))]
    return sources + [
        f"{R}/{name}/prompts.parquet",
        *[f"{R}/{name}/{kind}/{pol}.parquet" for kind in ("responses", "rewards") for pol in pols],
    ]


def trained_models(wildcards):
    """Role -> folder of the trained models: `trained` (FOMAML), `seed<N>` per training run (RL)."""
    if exp_of(wildcards).algorithm == "fomaml":
        ckpts = meta_checkpoints(wildcards.exp)
        main = exp_of(wildcards).meta.method
        return {"trained": ckpts[main][0], **{f"baseline_{m}": ck for m, (ck, _) in ckpts.items() if m != main}}
    return {f"seed{s}": run_file(wildcards.exp, s, "checkpoint") for s in seeds_of(wildcards.exp)}


def provenance_models(wildcards):
    """`--model ROLE=PATH` of the models behind the result: the base (or initial) model and the trained ones."""
    e = exp_of(wildcards)
    base = meta_base_path(wildcards) if e.algorithm == "fomaml" else base_policy(wildcards.exp)
    roles = {"base": base, **trained_models(wildcards)}
    return " ".join(f"--model {shlex.quote(f'{k}={v}')}" for k, v in roles.items())


def provenance_model_inputs(wildcards):
    e = exp_of(wildcards)
    base = meta_base_input(wildcards) if e.algorithm == "fomaml" else base_policy_input(wildcards)
    return base + list(trained_models(wildcards).values())


# -- targets -----------------------------------------------------------------------------------


def final_targets():
    """Every chosen experiment's report (which pulls in everything upstream) and the summary."""
    for exp in set(CFG.run_experiments or EXPERIMENTS) - set(CHOSEN):
        print(f"note: skipping MLX experiment '{exp}' under the slurm profile", file=sys.stderr)
    return [f"{R}/{e}/report/report.html" for e in CHOSEN] + [f"{R}/summary.html"]


def summary_inputs(kind):
    return [f"{R}/{e}/{kind}" for e in CHOSEN]


def summary_metrics():
    """Every chosen experiment's train_metrics: one per training run (RL), one per FOMAML experiment."""
    out = []
    for e in CHOSEN:
        if EXPERIMENTS[e].algorithm == "fomaml":
            out.append(f"{R}/{e}/train_metrics.parquet")
        else:
            out += [run_file(e, s, "metrics") for s in seeds_of(e)]
    return out


def reported_json():
    return as_json({e: EXPERIMENTS[e].model_dump(mode="json") for e in CHOSEN})
