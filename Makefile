# Two commands do all set-up on a fresh machine (Python 3.11 and make):
#   make up    build what is needed, then run Triton + the facade on 127.0.0.1 until Ctrl-C
#   make test  build what is needed, then run the whole test suite
#   make compose-test  the docker compose stack, built and smoke-tested (docs/operations.md, Deploy)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# Training on cores shared with serving: OpenMP's busy-wait makes idle threads spin and starve the
# other processes (docs/benchmarks.md, Training job and hot swap). torch reads this once, at load.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install models up lint test test-fast compose-test bench bench-smoke bench-sweep clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['fluxserve']['no-deps']))")
	touch $(STAMP)

install: $(STAMP)

# Train the classifier (if not trained), build the local FLUX (if not built) and export both
# into model_repository/. Idempotent: unchanged models keep their version.
models: install
	$(BIN)/fluxserve-train defaults

up: models
	$(BIN)/python -m runtime.stack

# ruff (pinned in the test extra, configured in pyproject.toml): lint rules and the formatter's layout.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest twice, side by side (tests/run_suite.py): the real-stack tests at normal priority, the
# in-process tests (tests/unit) at nice 19 in the cores' idle time, their log
# (build/logs/unit-tests.log) printed at the end.
test: lint models
	$(BIN)/python -m tests.run_suite $(PYTEST_ARGS)

# The docker compose cpu stack for real (not part of `make test`): Docker engine (installed and
# started when missing), images, `--scale worker=2`, the smoke suite in tests/compose/, then down.
compose-test: install
	PYTHON=$(BIN)/python bash deploy/compose/compose_test.sh

test-fast: install
	$(BIN)/python -m pytest -ra -m "not integration and not e2e and not slow" $(PYTEST_ARGS)

# docs/benchmarks.md's measured tables: load through both doors vs the baseline, the classifier's
# precisions, a training job + hot swap under load, goodput under retries, per-request adapters
# mixed through Triton and an adapter job's time to its first image, then the tables spliced into the page.
bench: models
	$(BIN)/fluxserve-bench run
	$(BIN)/fluxserve-bench precision
	$(BIN)/fluxserve-bench swap
	$(BIN)/fluxserve-bench goodput
	$(BIN)/fluxserve-bench adapter-mix
	$(BIN)/fluxserve-bench adapter-ready
	$(BIN)/fluxserve-bench docs

bench-smoke: models
	$(BIN)/fluxserve-bench run --smoke --out build/bench-smoke

bench-sweep: models
	$(BIN)/fluxserve-bench sweep --repeats 2

# adapters/: published LoRAs fitted to the base model that build/ held (common/adapter_store.py).
clean:
	rm -rf build adapters model_repository/*/[0-9]* model_repository/*/config.pbtxt
