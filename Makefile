# The two commands of the README. Each sets up .venv from scratch when it is missing.
#   make train   install, then the main job: mapo-train end to end on the built-in task
#   make test    install, then run the test suite (what CI runs)
# and the benchmarks:
#   make bench   install, then run the benchmarks at CPU scale and write bench/results/
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" for GPUs.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench

install: $(STAMP)

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/mapo-train --out runs/mapo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/mapo-bench --scale cpu
