"""A hostPath volume provisioner, so PersistentVolumeClaims (and `pvc://` model sources)
work: a default StorageClass, a PV per pending claim under .cluster/volumes/, bound by the
controller-manager's PV controller through the claimRef we pre-set, and deleted (folder
too) once released. Like kind's local-path provisioner, without the helper pods."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .runtime import call
from .store import Store

log = logging.getLogger(__name__)

CLASS_NAME = "standard"
PROVISIONER = "modelfleet.dev/localkube-hostpath"


class Provisioner:
    def __init__(self, api: client.ApiClient, claims: Store, volumes: Store, root: Path) -> None:
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.claims, self.volumes, self.root = claims, volumes, root
        self._lock = threading.Lock()

    def start(self) -> None:
        try:
            call(self.storage.create_storage_class, {
                "metadata": {"name": CLASS_NAME,
                             "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
            })
        except ApiException as exc:
            if exc.status != 409:
                log.warning("creating StorageClass %s: %s", CLASS_NAME, exc.reason)
        self.claims.add_handler(self.on_claim)
        self.volumes.add_handler(self.on_volume)

    def on_claim(self, kind: str, pvc: dict) -> None:
        spec, meta = pvc["spec"], pvc["metadata"]
        if kind == "DELETED" or spec.get("volumeName") or spec.get("storageClassName") != CLASS_NAME:
            return
        name = f"pvc-{meta['uid']}"
        with self._lock:
            if self.volumes.get("", name):
                return
            path = self.root / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
            path.mkdir(parents=True, exist_ok=True)
            # Writable by any user, as local-path-provisioner makes them: a container of the
            # real node runs as its image's or securityContext's user (65532 for ours).
            path.chmod(0o777)
            size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            pv = {
                "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": CLASS_NAME,
                    "volumeMode": spec.get("volumeMode") or "Filesystem",
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                 "name": meta["name"], "uid": meta["uid"]},
                },
            }
            try:
                call(self.core.create_persistent_volume, pv)
                log.info("provisioned %s for %s/%s at %s", name, meta["namespace"], meta["name"], path)
            except ApiException as exc:
                if exc.status != 409:
                    log.warning("provisioning %s: %s", name, exc.reason)

    def on_volume(self, kind: str, pv: dict) -> None:
        ours = (pv["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
        if kind == "DELETED" or not ours or (pv.get("status") or {}).get("phase") != "Released":
            return
        path = Path(pv["spec"]["hostPath"]["path"])
        if self.root in path.parents:
            shutil.rmtree(path, ignore_errors=True)
        try:
            call(self.core.delete_persistent_volume, pv["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 404:
                log.warning("deleting released %s: %s", pv["metadata"]["name"], exc.reason)
