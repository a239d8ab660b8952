"""localkube: the local Kubernetes cluster that the end-to-end tests run on.

A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) built
from the Go module proxy, plus a Python node agent that runs pods as local processes, each
in a network namespace of its own. Test infrastructure, not product code.
"""
