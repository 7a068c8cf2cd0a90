# One command runs the tests (`make test`); one runs the main job (`make generate`).
# Tests run in 2 processes of 1 thread each: more threads than cores makes OpenMP spin-wait and slows the suite
# more than tenfold on a 2-core machine.
# Both create .venv on first use: torch is pinned to the CPU wheel (`torch==2.13.0`) before anything else is
# installed, so no dependency can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= a red circle above a blue square

.PHONY: install test test-slow lint format generate bench-samplers bench-shapes bench-dalle2 clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,interop]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m slow

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

generate: $(STAMP)
	$(BIN)/t2i generate "$(PROMPT)"

bench-samplers: $(STAMP)
	$(BIN)/python benchmarks/samplers.py

bench-shapes: $(STAMP)
	$(BIN)/python benchmarks/shapes_eval.py

# t2i's unCLIP Unet and prior vs DALLE2-pytorch's. dalle2-pytorch pins torchvision, so it gets its own venv with the
# same torch build installed first (see benchmarks/vs_dalle2_pytorch.py on PyPI torchvision's compiled ops).
DALLE2_VENV := .venv-dalle2
$(DALLE2_VENV)/.installed:
	@test -x $(DALLE2_VENV)/bin/python || $(PYTHON) -m venv $(DALLE2_VENV)
	$(DALLE2_VENV)/bin/pip install -q torch==2.13.0
	$(DALLE2_VENV)/bin/pip install -q "dalle2-pytorch==1.15.6" "setuptools<81"
	@touch $@

bench-dalle2: $(STAMP) $(DALLE2_VENV)/.installed
	$(BIN)/python benchmarks/vs_dalle2_pytorch.py

clean:
	rm -rf $(VENV) $(DALLE2_VENV) .pytest_cache .ruff_cache *.egg-info
