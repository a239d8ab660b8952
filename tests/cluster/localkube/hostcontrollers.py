"""`python -m localkube.hostcontrollers`: the ingress stand-in and the `standard` StorageClass's
provisioner beside the real node (node kind `kubelet`), in a small host process.

The agent runs both controllers in its own process. The real node has no agent, but what the
two need is on the host there too: pod IPs are reachable over the node's bridge (nginx, on
INGRESS_URL, proxies straight to ready pod addresses), and a hostPath PV is a folder of the
host's. So the same controllers run here, imported from `localkube.agent` (one home for each);
`localkube up` starts this process after nginx, `down` stops it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from .config import Settings

log = logging.getLogger("localkube.hostcontrollers")
NAME = "node-controllers"


def start(api: Any, s: Settings, stop: threading.Event) -> None:
    """Start the ingress controller (rendering the nginx that `up` runs) and the provisioner,
    each on its own list-and-watch caches, and wait until those have synced. (Imports are
    here: `localkube up` reads this module's other parts without the API client.)"""
    from kubernetes import client

    from .agent import ingress, storage
    from .agent.store import Store, wait_synced

    core, disc, net = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.NetworkingV1Api(api)
    services = Store("services", core.list_service_for_all_namespaces)
    slices = Store("endpointslices", disc.list_endpoint_slice_for_all_namespaces)
    ingresses = Store("ingresses", net.list_ingress_for_all_namespaces)
    claims = Store("persistentvolumeclaims", core.list_persistent_volume_claim_for_all_namespaces)
    volumes = Store("persistentvolumes", core.list_persistent_volume)
    storage.Provisioner(api, claims, volumes, s.state / "volumes").start()
    ingress.IngressController(api, ingresses, services, slices, s.state / "nginx" / "nginx.conf",
                              s.state / "nginx" / "nginx.pid", s.ports.ingress, s.logs).start(stop)
    stores = [services, slices, ingresses, claims, volumes]
    for store in stores:
        store.start(stop)
    wait_synced(stores)


def healthy(s: Settings) -> Callable[[], bool]:
    """Both classes exist (each controller creates its own at start)."""
    from .agent import ingress, storage

    kubectl = str(s.k8s_bin / "kubectl")
    env = {**os.environ, "KUBECONFIG": str(s.kubeconfig)}

    def ready() -> bool:
        proc = subprocess.run([kubectl, "get", f"ingressclass/{ingress.CLASS_NAME}",
                               f"storageclass/{storage.CLASS_NAME}", "-o", "name"],
                              capture_output=True, text=True, env=env, timeout=10)
        return proc.returncode == 0

    return ready


def argv(s: Settings) -> list[str]:
    return [s.python, "-m", "localkube.hostcontrollers"]


def main() -> int:
    from kubernetes import client, config

    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    config.load_kube_config()
    stop = threading.Event()
    start(client.ApiClient(), Settings(), stop)
    log.info("ingress and storage controllers running")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
