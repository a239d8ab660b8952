"""How every modelfleet process finds its API server: the pod's service account in a cluster,
the kubeconfig elsewhere (KUBECONFIG or ~/.kube/config: tests, laptops, the operator run on a
host). The official client's `config` module does the reading; this is only the order."""

from __future__ import annotations

from typing import Any


def api_client() -> Any:
    """A `kubernetes.client.ApiClient` from the in-cluster account, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
