# harness -- `make help` lists the targets. The README's two commands: `make train`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, so a CPU machine never pulls a multi-GB CUDA wheel. On a GPU machine:
#   make venv TORCH_SPEC='torch==2.13.0' PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv train test test-fast lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

venv: $(BIN)/.installed ## create .venv and install the project (CPU torch by default)

train: venv ## run the default job (CPU, offline, shipped digits dataset); extra overrides: ARGS='...'
	$(BIN)/python -m harness.train $(ARGS)

test: venv ## run the test suite (CPU; real processes; gpu/slurm tests skip without them)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv ## the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv ## ruff over the code and tests; mypy over harness/ (cold ~17 s on 2 cores, cached <1 s)
	$(BIN)/ruff check harness tests examples bench
	$(BIN)/mypy

clean: ## remove run directories and caches (not .venv)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache .mypy_cache

# A throw-away one-node Slurm cluster for the tests marked `slurm` (scripts/slurm/cluster.sh; root,
# Debian packages). SLURM_FAKE_CPUS lets two 2-task jobs run side by side on a 2-core machine.
SLURM_DIR ?= $(CURDIR)/.slurm
SLURM_FAKE_CPUS ?= 4
SLURM_CONF ?= $(SLURM_DIR)/etc/slurm.conf
.PHONY: slurm-up slurm-down test-slurm

slurm-up: ## start a one-node Slurm cluster under .slurm/ (installs it; root); then: source .slurm/env.sh
	SLURM_FAKE_CPUS=$(SLURM_FAKE_CPUS) scripts/slurm/cluster.sh start $(SLURM_DIR)

slurm-down: ## cancel the cluster's jobs and stop its daemons
	scripts/slurm/cluster.sh stop $(SLURM_DIR)

test-slurm: venv ## only the Slurm tests (real jobs; needs slurm-up or SLURM_CONF of a cluster)
	SLURM_CONF=$(SLURM_CONF) $(BIN)/python -m pytest tests/slurm $(PYTEST_ARGS)

# A 2-node Slurm cluster on emulated hosts (scripts/slurm/lab.sh; root): by hand. The tests marked
# `multinode` in tests/slurm start one of their own per test.
SLURM_LAB_DIR ?= $(CURDIR)/.slurm-lab
.PHONY: slurm-lab-up slurm-lab-down
slurm-lab-up: ## start a 2-node Slurm cluster on emulated hosts under .slurm-lab/ (root); then: source .slurm-lab/env.sh
	scripts/slurm/lab.sh start $(SLURM_LAB_DIR) 2

slurm-lab-down: ## cancel its jobs and take its hosts down
	scripts/slurm/lab.sh stop $(SLURM_LAB_DIR)

# Emulated hosts (scripts/hosts.sh: network namespaces on a bridge of their own; root) for the tests
# marked `multinode`; each test brings up and takes down its own.
.PHONY: test-multinode
test-multinode: venv ## only the multinode tests (several emulated hosts on this machine; root)
	$(BIN)/python -m pytest tests/multinode tests/test_rundir.py $(PYTEST_ARGS)

.PHONY: bench
bench: venv ## harness vs a hand-written loop (~9 min on 2 cores), then make train's job vs the same by hand (~4 min); ARGS='--help' (bench.run's)
	$(BIN)/python -m bench.run $(ARGS)
	$(BIN)/python -m bench.job

.PHONY: bench-job
bench-job: venv ## only make train's job against the same job by hand (bench/by_hand.py), 10 rounds with an A/A pair (~4 min)
	$(BIN)/python -m bench.job $(ARGS)

.PHONY: bench-memory
bench-memory: venv ## per-rank bytes, build and train peaks, step and checkpoint times: ddp vs fsdp at 1, 2, 4 ranks (~3-5 min); ARGS='--help'
	$(BIN)/python -m bench.memory $(ARGS)

.PHONY: bench-peers
bench-peers: venv ## reference, harness, Lightning, Accelerate interleaved on cnn x2 (~15 min; needs pip install -e '.[peers]'); ARGS='--help'
	$(BIN)/python -m bench.peers $(ARGS)
