# Two commands for a fresh machine: `make run` (the embedded default) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# This machine has the CPU wheel of torch 2.13.0 on disk; pinning it first keeps pip from
# pulling a CUDA build. On a Mac or a GPU box: make run TORCH=torch
TORCH   ?= torch==2.13.0
CORES   ?= 2
STAMP   := $(VENV)/.installed
# Peers that benchmarks/ compare against, kept out of the venv in a folder of their own (the
# benchmarks import them from there). Pinned for reproducible figures; --no-deps because their
# dependencies (mlx, mlx-lm, transformers, datasets, ...) are the project's own, already in the venv.
# mlx-lm-lora: benchmarks/train_step.py (its train_grpo against our MLX trainer).
BENCH_DEPS  := .bench-deps
BENCH_PEERS := mlx-lm-lora==5.10.2
BENCH_STAMP := $(BENCH_DEPS)/.installed-$(subst ==,-,$(subst $(eval) ,+,$(BENCH_PEERS)))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-fast test-slurm bench bench-deps lint dryrun clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[mlx,torch,dev]"
	touch $@

setup: $(STAMP)

run: setup
	snakemake --profile profiles/default --cores $(CORES)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

test-slurm: setup
	$(PY) -m pytest -q -m slurm

# A new pin gives a new stamp name, so the folder is rebuilt from scratch; otherwise nothing runs.
$(BENCH_STAMP): | $(STAMP)
	rm -rf $(BENCH_DEPS)
	$(PY) -m pip install -q --no-deps --target $(BENCH_DEPS) $(BENCH_PEERS)
	$(PY) -c "import sys; sys.path.append('$(BENCH_DEPS)'); import mlx_lm_lora.trainer.grpo_trainer"
	touch $@

bench-deps: $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: setup
	ruff check src tests benchmarks scripts
	snakefmt --check Snakefile rules
	snakemake --lint

dryrun: setup
	snakemake -n --cores $(CORES)

clean:
	rm -rf results .snakemake
