# Two commands for a fresh machine: `make run` (the embedded default) and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
UV      := $(VENV)/bin/uv
UV_VERSION := 0.13.9
# Every package at the version of requirements.lock (`make lock` refreshes it), installed with uv.
# torch is pinned in the lock's header and installed on its own, from the build that fits the
# machine: pip's find-links here (the CPU wheel on this disk), else PyPI (CUDA on Linux, macOS wheel
# on a Mac). For the CPU build elsewhere: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
LOCK    := requirements.lock
TORCH   ?= torch==$(shell sed -n 's/^\# pin: torch==//p' $(LOCK))
TORCH_SOURCE := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) $(if $(TORCH_INDEX),--index $(TORCH_INDEX))
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

.PHONY: setup run test test-fast test-slurm bench bench-deps lint lock dryrun clean

# --compile-bytecode: .pyc files written at install time. Without them every Python process compiles what it
# imports from source, and where PYTHONDONTWRITEBYTECODE is set (this project's CI machines) it does so every
# time: `import trl, transformers.trainer` took 26.5 s per process on a loaded 2-core machine, 7.7 s compiled.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps -r $(LOCK)
	$(UV) pip install -q --compile-bytecode --python $(PY) $(TORCH_SOURCE) "$(TORCH)"
	$(UV) pip install -q --compile-bytecode --python $(PY) --no-deps -e .
	touch $@

setup: $(STAMP)

run: setup
	rlmeta unlock  # a killed run's stale lock, only when no Snakemake uses this folder
	snakemake --profile profiles/default --cores $(CORES)
	rlmeta times --results results  # where the time went, per rule

# Two pytest-xdist workers, whole files per worker (module fixtures build once): ~40% less wall time on 2 cores
# than one process, since much of a test's time is spent waiting on subprocesses (Snakemake, torchrun, SLURM).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm"

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

# Re-resolve every dependency (needs PyPI): requirements.lock and the pinned envs/*.yaml.
lock: setup
	$(PY) scripts/lock.py

dryrun: setup
	snakemake -n --cores $(CORES)

clean:
	rm -rf results .snakemake
