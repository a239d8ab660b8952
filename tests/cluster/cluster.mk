# Local Kubernetes cluster for the end-to-end tests (see tests/cluster/README.md).
# Included by the top-level Makefile; all paths are relative to the repository root.

CLUSTER_DIR := tests/cluster
PYTHON ?= python3
LOCALKUBE := PYTHONPATH=$(CLUSTER_DIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m localkube

.PHONY: cluster-deps cluster-build cluster-up cluster-down cluster-status

cluster-deps:  ## install nginx, iproute2, openssl, runc, iptables, conntrack, the CNI plugins and the kubernetes client if missing
	@PYTHON=$(PYTHON) bash $(CLUSTER_DIR)/scripts/install-deps.sh

cluster-build:  ## build etcd, the control plane, kubectl, helm and the node (kubelet, kube-proxy, containerd, crictl, CoreDNS) into the version-keyed cache
	@bash $(CLUSTER_DIR)/scripts/build.sh

cluster-up: cluster-deps cluster-build  ## start the cluster (a no-op when it is already up)
	@$(LOCALKUBE) up

cluster-down:  ## stop everything and remove pods, network namespaces and the bridge
	@$(LOCALKUBE) down

cluster-status:
	@$(LOCALKUBE) status

# The real node's tests (test_node*.py, and the whole e2e tier from the project's images) on a
# second cluster whose node is a kubelet on containerd (second-cluster.env: its own ports, bridge,
# CIDRs; its own state in .cluster-node), started and stopped around them, beside the agent's
# cluster, which now runs only the tests of the cluster itself (`make test` leaves NODE_TESTS out
# of its run on the agent).
NODE_CLUSTER_ENV = $$(grep -v '^\#' $(CLUSTER_DIR)/second-cluster.env | xargs) MODELFLEET_CLUSTER_DIR=$(CURDIR)/.cluster-node
# The images those tests run, all that `make images` builds.
NODE_IMAGES ?= control-plane worker vllm-cpu
NODE_TESTS = $(CLUSTER_DIR)/test_node.py $(CLUSTER_DIR)/test_node_operator.py $(sort $(wildcard tests/e2e/test_*.py))

.PHONY: test-node node-tier node-cluster-up node-cluster-down node-load-images

test-node: cluster-deps images  ## build and start a second cluster on a real node (kubelet, containerd), load the project's images, run its tests, stop it
	@$(MAKE) --no-print-directory node-tier

# test-node without building its prerequisites again: `make test` builds them once and runs this
# beside test-host, where a second no-op images/build.sh would take 16 s of CPU from both runs.
node-tier:
	@env $(NODE_CLUSTER_ENV) bash $(CLUSTER_DIR)/scripts/build.sh
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) up
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) load-images $(NODE_IMAGES) && \
	  env $(NODE_CLUSTER_ENV) MODELFLEET_REQUIRE_VLLM=1 $(PYTHON) -m pytest -v --durations=15 $(NODE_TESTS); rc=$$?; \
	  env $(NODE_CLUSTER_ENV) $(LOCALKUBE) down; exit $$rc

node-cluster-up: cluster-deps images  ## start the real-node cluster of test-node and load the images into it, to run its tests by hand (`source .cluster-node/env`)
	@env $(NODE_CLUSTER_ENV) bash $(CLUSTER_DIR)/scripts/build.sh
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) up
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) load-images $(NODE_IMAGES)

node-load-images:  ## copy the images `make images` built (NODE_IMAGES) into the running real-node cluster's containerd
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) load-images $(NODE_IMAGES)

node-cluster-down:  ## stop the real-node cluster of test-node
	@env $(NODE_CLUSTER_ENV) $(LOCALKUBE) down
