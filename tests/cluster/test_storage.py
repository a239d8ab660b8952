"""PersistentVolumeClaims get a hostPath volume from the default StorageClass, and a pod
writing to its claim leaves the data in the bound volume's folder (how `pvc://` model
sources get their files in e2e tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from localkube.manifests import TEST_IMAGE, pod
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e


def test_claim_is_provisioned_bound_and_mounted(cluster: LocalCluster, namespace: str) -> None:
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    writer = {"name": "w", "image": TEST_IMAGE, "command": ["sh", "-c", "echo weights > /models/tiny.bin"],
              "volumeMounts": [{"name": "m", "mountPath": "/models"}]}
    cluster.apply(claim, pod("writer", [writer], restartPolicy="Never",
                             volumes=[{"name": "m", "persistentVolumeClaim": {"claimName": "models"}}]),
                  namespace=namespace)
    pvc = wait_for(lambda: (c := cluster.get("pvc", "models", namespace)) and c["status"].get("phase") == "Bound" and c,
                   60, what="the claim to be Bound")
    assert pvc["spec"]["storageClassName"] == "standard"
    wait_for(lambda: cluster.get("pod", "writer", namespace)["status"].get("phase") == "Succeeded", 60, what="Succeeded")
    pv = cluster.get("pv", pvc["spec"]["volumeName"], "default")
    assert (Path(pv["spec"]["hostPath"]["path"]) / "tiny.bin").read_text() == "weights\n"
