# modelfleet developer tasks.

.DEFAULT_GOAL := help

.PHONY: help
help:
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

PYTHON ?= python3
export MODELFLEET_CACHE ?= $(HOME)/.cache/modelfleet

.PHONY: install test test-fast lint serve bench
install: ## install modelfleet with its test dependencies into the current Python
	$(PYTHON) -m pip install --quiet -e ".[test]"

test: install vllm images cluster-up ## install what is needed (vLLM's CPU build, the images too), start the local cluster, and run every tier
	MODELFLEET_REQUIRE_VLLM=1 $(PYTHON) -m pytest -q --durations=25 $(addprefix --ignore=,$(NODE_TESTS))
	@$(MAKE) --no-print-directory test-node

test-fast: ## unit and component tests only (no processes, no cluster)
	$(PYTHON) -m pytest -q tests/unit tests/component

lint:
	$(PYTHON) -m ruff check .

serve: ## run the embedded default on http://127.0.0.1:8000
	modelfleet serve

include vllm.mk
include images.mk
include tests/cluster/cluster.mk
