# `make demo` sets up .venv and runs the offline demo; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; on a GPU machine install your own torch into .venv first and it is kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-installed

.PHONY: setup demo test test-fast test-gpu bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,plots]"
	touch $(STAMP)

demo: setup
	$(BIN)/posttrain demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-gpu: setup
	POSTTRAIN_TEST_GPU=1 $(BIN)/python -m pytest -q tests/gpu

bench: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
