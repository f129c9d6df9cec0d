# RecServe: the one entry point. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENGINE ?= replay
TRACES ?= ../shared/traces/zellinger
# llama.cpp builds from source: text only (no LLaVA) and portable (no -march=native) so the wheel runs anywhere.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
PROTO := proto/recserve/v1/tier.proto
STUBS := src/recserve/v1

.PHONY: help install proto proto-check lint typecheck check test test-unit test-integration demo bench models demo-trace clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(BIN)/recserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[dev,models,llama-cpp]"
	touch $@

install: $(BIN)/recserve ## set up .venv/ with the library, llama.cpp and the dev tools

proto: install ## regenerate the gRPC stubs from proto/
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto --python_out=src --pyi_out=src \
		--grpc_python_out=src --mypy_grpc_out=src $(PROTO)

proto-check: proto ## fail if the committed stubs differ from freshly generated ones
	@if [ -n "$$(git status --porcelain -- $(STUBS))" ]; then \
		git status --short -- $(STUBS); echo "stubs are stale: run 'make proto' and commit them"; exit 1; fi

lint: install ## ruff format check and lint
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

typecheck: install ## mypy on the library
	$(BIN)/mypy

check: proto-check lint typecheck ## everything but the tests

test: install ## stub check, lint, types, then all tests (unit, in-process gRPC, integration)
	$(MAKE) --no-print-directory check
	$(BIN)/pytest

test-unit: install ## unit and in-process gRPC tests only (fast)
	$(BIN)/pytest -m "not integration"

demo: install ## three local tiers answer benchmark questions (ENGINE=replay|llama_cpp)
	$(BIN)/recserve demo --engine $(ENGINE)

bench: install ## benchmarks: threshold tracker against numpy.percentile per request
	$(BIN)/python bench/threshold_bench.py

models: install ## generate the tiny device < edge < cloud models into models/
	$(BIN)/recserve models make models

demo-trace: install ## rebuild the bundled demo trace from a full trace folder (TRACES=...)
	$(BIN)/python -c "from recserve.traces import write_subset; \
		print(write_subset('$(TRACES)', 'src/recserve/data/traces/zellinger-demo', \
		['llama3.2-1b', 'llama3.1-8b', 'llama3.1-70b'], \
		{'mmlu': 'test', 'medmcqa': 'test', 'triviaqa': 'test', 'truthfulqa': 'test', 'gsm8k': 'train'}), 'queries')"

clean: ## remove the virtualenv, caches and generated models
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
