# modelfleet developer tasks.

.DEFAULT_GOAL := help

.PHONY: help
help:
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

PYTHON ?= python3
export MODELFLEET_CACHE ?= $(HOME)/.cache/modelfleet

.PHONY: install test test-host test-fast lint serve bench
install: ## install modelfleet with its test dependencies into the current Python
	$(PYTHON) -m pip install --quiet -e ".[test]"

# The host's tiers and the real node's (test-node) run side by side: on 2 cores, 15 min instead
# of 20 one after the other, since each waits on processes and pods a good part of its time.
# Each line of their output is tagged with its run.
test: install vllm images cluster-up ## install what is needed (vLLM's CPU build, the images too), start the local cluster, and run every tier
	@$(MAKE) --no-print-directory -j2 tagged-test-host tagged-node-tier

test-host: ## every tier but the real node's, on the host and the local cluster (which must be up)
	MODELFLEET_REQUIRE_VLLM=1 $(PYTHON) -m pytest -q --durations=25 $(addprefix --ignore=,$(NODE_TESTS))

tagged-%:
	@bash scripts/tagged.sh $* $(MAKE) --no-print-directory $*

test-fast: ## unit and component tests only (no processes, no cluster)
	$(PYTHON) -m pytest -q tests/unit tests/component

lint:
	$(PYTHON) -m ruff check .

serve: ## run the embedded default on http://127.0.0.1:8000
	modelfleet serve

include vllm.mk
include images.mk
include tests/cluster/cluster.mk
