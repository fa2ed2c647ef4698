# Two commands for a fresh machine: `make run` (the embedded default) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# This machine has the CPU wheel of torch 2.13.0 on disk; pinning it first keeps pip from
# pulling a CUDA build. On a Mac or a GPU box: make run TORCH=torch
TORCH   ?= torch==2.13.0
CORES   ?= 2
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-fast test-slurm bench lint dryrun clean

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

bench: setup
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: setup
	snakemake --lint

dryrun: setup
	snakemake -n --cores $(CORES)

clean:
	rm -rf results .snakemake
