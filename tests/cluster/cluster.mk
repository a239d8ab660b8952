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
