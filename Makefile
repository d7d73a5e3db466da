# The project's own installer and entry points. `make demo` and `make test` work on a fresh
# Debian machine as root: they install the system packages, a virtual environment, the CPU
# build of torch and the project itself before doing anything else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := softhsm2 swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config postgresql
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup system-packages demo test test-busy lint protos check-protos bench gpu-check fuzz clean

setup: system-packages $(STAMP)

system-packages:
	@if ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
	  echo "==> installing system packages: $(SYSTEM_PACKAGES)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# Each step says what it installs, and pip lists every package it collects and installs
# (a progress bar on a terminal), so a first `make demo` never sits silent for minutes.
$(STAMP): pyproject.toml
	@echo "==> [1/4] creating the virtual environment $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	$(BIN)/pip install --upgrade --progress-bar on pip | grep -v '^Requirement already'; \
	  test $${PIPESTATUS[0]} -eq 0
	@echo "==> [3/4] installing $(TORCH_CPU) (CPU build, the largest download)"
	$(BIN)/pip install --progress-bar on "$(TORCH_CPU)" | grep -v '^Requirement already'; \
	  test $${PIPESTATUS[0]} -eq 0
	@echo "==> [4/4] installing the project and its dependencies (.[test,tpm,train])"
	@# setuptools prints an informational "Editable installation" notice on every editable
	@# install (not a problem in pyproject.toml); only that message is filtered
	PYTHONWARNINGS="ignore:Editable installation" \
	$(BIN)/pip install --progress-bar on -e ".[test,tpm,train]" | grep -v '^Requirement already'; \
	  test $${PIPESTATUS[0]} -eq 0
	@echo "==> $(VENV) ready"
	touch $@

# DEMO_STATE=postgres: the provider broker on the compose `postgres` service; DEMO_STORE=s3:
# the dataset in the compose `s3` service (defaults: embedded SQLite, the shared volume)
DEMO_STATE ?= sqlite
DEMO_STORE ?= local
demo: setup
	$(BIN)/python -m demo --state $(DEMO_STATE) --store $(DEMO_STORE)

lint: setup
	$(BIN)/ruff check .

protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python scripts/gen_protos.py --check

test: setup
	$(BIN)/ruff check .
	@if [ -f scripts/gen_protos.py ]; then $(BIN)/python scripts/gen_protos.py --check; fi
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The suite beside a CPU hog of twice the core count (busy-loop processes at normal
# priority): how a shared CI runner feels. The hog is stopped however the suite ends.
test-busy: setup
	@hogs=$$(( 2 * $$(nproc) )); echo "==> make test beside $$hogs busy-loop processes"; \
	pids=""; for i in $$(seq $$hogs); do \
	  $(BIN)/python -c 'while True: pass' & pids="$$pids $$!"; done; \
	trap 'kill $$pids 2>/dev/null; wait $$pids 2>/dev/null' EXIT INT TERM; \
	start=$$(date +%s); status=0; \
	$(MAKE) --no-print-directory test PYTEST_ARGS="$(PYTEST_ARGS)" || status=$$?; \
	echo "==> test-busy: status $$status after $$(( $$(date +%s) - start )) s"; exit $$status

bench: setup
	$(BIN)/python -m benchmarks --quick

# On an NVIDIA GPU machine (with a CUDA build of torch in the venv): CUDA tests, NCCL DDP,
# the trainer on CUDA, a GPU memory scan after shredding, NVML facts; prints goal lines.
# Without a GPU it stops at once with exit status 2.
gpu-check: setup
	$(BIN)/pip install -q -e ".[gpu]"
	PY=$(BIN)/python bash scripts/gpu_check.sh

# Coverage-guided fuzzing of every parser of untrusted bytes (fuzz/, docs/fuzzing.md): each
# harness runs FUZZ_SECONDS under atheris and prints `goal fuzz_NAME_crashes: ...`.
# FUZZ_TARGETS=name1 name2 picks harnesses; FUZZ_KEEP=K merges what a run found into the
# in-repo corpus (at most K files per harness); FUZZ_RUNS=N stops a harness after N
# executions (the full campaign: `make fuzz FUZZ_SECONDS=1800 FUZZ_RUNS=1000000`).
# `make test` only replays the corpus.
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?=
FUZZ_TARGETS ?=
FUZZ_KEEP ?=
FUZZ_STAMP := $(VENV)/.fuzz-installed

$(FUZZ_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[fuzz]"
	touch $@

fuzz: setup $(FUZZ_STAMP)
	$(BIN)/python -m fuzz run --seconds $(FUZZ_SECONDS) $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS)) $(if $(FUZZ_KEEP),--keep $(FUZZ_KEEP)) $(FUZZ_TARGETS)

clean:
	rm -rf $(VENV) run .pytest_cache .ruff_cache .hypothesis
