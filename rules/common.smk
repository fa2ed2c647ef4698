# Helpers shared by the rules: validated config, paths, and small input functions.
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from rlmeta.config import ConfigError, load_schema, validate as validate_config  # noqa: E402

try:
    _validated = validate_config(config)
except ConfigError as err:
    sys.exit(str(err))
validate(_validated, schema=str(Path(workflow.basedir) / "config" / "schema.yaml"), set_default=False)
config.clear()
config.update(_validated)

R = config["results"]
EXPERIMENTS = config["experiments"]
DATASETS = config["datasets"]
MODELS = config["models"]
SEED = config["seed"]


def names_of_kind(kind):
    """Regex alternation of the dataset names of one kind (matches nothing when none)."""
    names = [n for n, d in DATASETS.items() if d["kind"] == kind]
    return "|".join(names) if names else "(?!x)x"


def exps_where(**conditions):
    """Regex alternation of experiment names whose fields equal (or are in) ``conditions``."""
    def ok(e):
        return all(e[k] in v if isinstance(v, (tuple, list)) else e[k] == v for k, v in conditions.items())

    names = [n for n, e in EXPERIMENTS.items() if ok(e)]
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) if names else "(?!x)x"


def rl_experiments():
    return [n for n, e in EXPERIMENTS.items() if e["algorithm"] != "fomaml"]


def as_json(obj):
    """JSON for a shell argument (quote it with the :q format spec)."""
    return json.dumps(obj, sort_keys=True)


def is_local(source):
    """True when a dataset source or feed is a local path rather than a hub id or URL."""
    if source.startswith(("http://", "https://")):
        return False
    return Path(source.removeprefix("file://")).exists()


def local_files(source):
    """Files under a local source folder (so edits re-run the step); [] for hub ids and URLs."""
    if not is_local(source):
        return []
    p = Path(source.removeprefix("file://"))
    return sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [str(p)]


def cap_args(ds):
    """--max-train/--max-test flags of a dataset block (omitted when null)."""
    return " ".join(f"--{k.replace('_', '-')} {ds[k]}" for k in ("max_train", "max_test") if ds.get(k))


def feeds_of(dataset):
    return DATASETS[dataset]["feeds"]


def all_feeds():
    """Feed name -> (dataset, url) over every rss dataset; names must be unique."""
    out = {}
    for ds, d in DATASETS.items():
        if d["kind"] != "rss":
            continue
        for feed, url in d["feeds"].items():
            if feed in out:
                raise WorkflowError(f"config error: feed name '{feed}' appears in datasets '{out[feed][0]}' and '{ds}'; feed names must be unique")
            out[feed] = (ds, url)
    return out


FEEDS = all_feeds()


def dataset_tables(dataset):
    """The prepared tables of a dataset, as make_prompts reads them."""
    kind = DATASETS[dataset]["kind"]
    if kind == "rss":
        return [f"{R}/data/{dataset}.parquet"]
    return [f"{R}/data/{dataset}/train.parquet", f"{R}/data/{dataset}/test.parquet"]


def model_dir(model):
    """Local folder of a built model, or the hub id / path of a real one."""
    m = MODELS[model]
    return f"{R}/models/{model}" if "build" in m else m["hf"]


def model_for_backend(model, backend):
    m = MODELS[model]
    if "build" in m:
        return f"{R}/models/{model}"
    return m.get("mlx", m["hf"]) if backend == "mlx" else m["hf"]


def model_input(model):
    """Snakemake input for a model: the built folder, or nothing for a hub model."""
    return [f"{R}/models/{model}"] if "build" in MODELS[model] else []


def warmstart_key(exp):
    """Folder name of the warm start ``exp`` uses: experiments with the same model, dataset,
    prompt, train-prompt cap and warm-start settings share one (``<model>_<prompt>_<hash>``)."""
    e = EXPERIMENTS[exp]
    sig = as_json([e["model"], e["dataset"], e["prompt"], e["max_train_prompts"], e["warmstart"], warmstart_backend(exp)])
    return f"{e['model']}_{e['prompt']}_{hashlib.sha256(sig.encode()).hexdigest()[:8]}"


def warmstart_source(key):
    """The experiment whose prompts a shared warm start reads: a named experiment before sweep points."""
    owners = [n for n in EXPERIMENTS if warmstart_key(n) == key]
    return min(owners, key=lambda n: ("__" in n, n))


def base_policy(exp):
    """The RL starting point: the (shared) warm-started checkpoint when warmstart.steps > 0."""
    e = EXPERIMENTS[exp]
    if e["warmstart"]["steps"] > 0:
        return f"{R}/warmstart/{warmstart_key(exp)}"
    return model_for_backend(e["model"], e["backend"])


def warmstart_backend(exp):
    e = EXPERIMENTS[exp]
    return e["warmstart"]["backend"] or e["backend"]


def base_policy_input(exp):
    e = EXPERIMENTS[exp]
    if e["warmstart"]["steps"] > 0:
        return [f"{R}/warmstart/{warmstart_key(exp)}"]
    return model_input(e["model"])


def policy_path(exp, policy):
    return base_policy(exp) if policy == "base" else f"{R}/{exp}/checkpoints/final"


def policy_input(exp, policy):
    return base_policy_input(exp) if policy == "base" else [f"{R}/{exp}/checkpoints/final"]


def wandb_args(wildcards=None, input=None):
    """W&B flags; used as a derived param (a function of input), so a mode change does not retrain."""
    w = config["wandb"]
    entity = f" --wandb-entity {w['entity']}" if w.get("entity") else ""
    return f"--wandb-mode {w['mode']} --wandb-project {w['project']}{entity}"


def check_platform(exp):
    """MLX experiments never go to Linux GPU nodes by accident."""
    if config["platform"] == "slurm" and EXPERIMENTS[exp]["backend"] == "mlx":
        raise WorkflowError(
            f"experiment '{exp}' uses backend mlx, which runs on Apple Silicon (or CPU only): "
            "run it with --profile profiles/apple-silicon or profiles/default, or set its backend to torch"
        )


def chosen_experiments():
    """Experiments `all` builds: run_experiments (or every one), minus MLX ones under slurm."""
    chosen = []
    for exp in config["run_experiments"] or list(EXPERIMENTS):
        if config["platform"] == "slurm" and EXPERIMENTS[exp]["backend"] == "mlx":
            print(f"note: skipping MLX experiment '{exp}' under the slurm profile", file=sys.stderr)
            continue
        chosen.append(exp)
    return chosen


CHOSEN = chosen_experiments()


def final_targets():
    """Every chosen experiment's report (which pulls in everything upstream) and the summary."""
    return [f"{R}/{e}/report/report.html" for e in CHOSEN] + [f"{R}/summary.html"]


def corpus_files():
    """Bundled text the BPE tokenizer is trained on."""
    base = Path(workflow.basedir) / "resources"
    files = [f for sub in ("rss", "gsm8k", "math") for f in sorted((base / sub).glob("*")) if f.is_file()]
    return [str(f.relative_to(workflow.basedir)) for f in files]


def eval_settings(exp):
    """Sampling settings of the held-out evaluation (max_prompts 0 = all)."""
    e = EXPERIMENTS[exp]
    ev = e["eval"]
    return {
        "split": ev["split"],
        "samples": ev["samples"],
        "temperature": ev["temperature"],
        "top_p": e["train"]["top_p"],
        "max_new_tokens": ev["max_new_tokens"] or e["train"]["max_new_tokens"],
        "max_prompts": ev["max_prompts"] or 0,
        "seed": SEED + 1,
    }


def train_spec(exp):
    """The part of an experiment that training depends on (eval changes do not retrain)."""
    e = EXPERIMENTS[exp]
    return {k: e[k] for k in ("algorithm", "rewards", "reward_params", "train")}


def env_for(exp):
    """Conda environment of an experiment's backend (used with --software-deployment-method conda)."""
    return f"../envs/{EXPERIMENTS[exp]['backend']}.yaml"
