"""`python -m localkube.agent`: register the nodes, then run pods, the service proxy and the
ingress stand-in until SIGTERM, which stops every pod's processes before exiting."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading

from kubernetes import client, config

from .. import network
from ..config import Settings
from . import kubeletapi
from .ingress import IngressController
from .nodes import NodeRegistry, NodeSpec
from .podmanager import PodManager
from .proxy import ServiceProxy
from .runtime import AddressPool, Runtime
from .storage import Provisioner
from .store import Store, wait_synced

log = logging.getLogger("localkube.agent")
KUBELET_PORT = 10250  # one kubelet API for every node: they share the bridge address


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="localkube.agent", description=__doc__)
    p.add_argument("--nodes", type=int, default=1, help="how many Nodes to register")
    p.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity of each node")
    p.add_argument("--cpu", default=os.environ.get("MODELFLEET_CLUSTER_NODE_CPU", "8"))
    p.add_argument("--memory", default=os.environ.get("MODELFLEET_CLUSTER_NODE_MEMORY", "32Gi"))
    env_labels = [x for x in os.environ.get("MODELFLEET_CLUSTER_NODE_LABELS", "").split(",") if "=" in x]
    p.add_argument("--label", action="append", default=env_labels, metavar="KEY=VALUE",
                   help="extra node label (also MODELFLEET_CLUSTER_NODE_LABELS=k=v,k2=v2)")
    p.add_argument("--backoff-base", type=float, default=2.0, help="CrashLoopBackOff start (s)")
    p.add_argument("--backoff-cap", type=float, default=60.0, help="CrashLoopBackOff ceiling (s)")
    return p.parse_args(argv)


def node_specs(s: Settings, args: argparse.Namespace) -> list[NodeSpec]:
    labels = dict(item.split("=", 1) for item in args.label)
    return [
        NodeSpec(
            name=f"localkube-{i}", pod_cidr=str(s.network.node_cidr(i)), internal_ip=str(s.network.gateway),
            kubelet_port=KUBELET_PORT, cpu=args.cpu, memory=args.memory, gpus=args.gpus, labels=labels,
            version=s.versions["K8S_VERSION"],
        )
        for i in range(args.nodes)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    s = Settings()
    config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = 64
    api = client.ApiClient(cfg)

    specs = node_specs(s, args)
    NodeRegistry(api, specs).register()
    rt = Runtime(s, api, {n.name: n for n in specs},
                 {n.name: AddressPool(ipaddress.IPv4Network(n.pod_cidr)) for n in specs},
                 backoff_base=args.backoff_base, backoff_cap=args.backoff_cap)

    stop = threading.Event()
    core, disc, net = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.NetworkingV1Api(api)
    services = Store("services", core.list_service_for_all_namespaces)
    rt.services = services
    slices = Store("endpointslices", disc.list_endpoint_slice_for_all_namespaces)
    ingresses = Store("ingresses", net.list_ingress_for_all_namespaces)
    claims = Store("persistentvolumeclaims", core.list_persistent_volume_claim_for_all_namespaces)
    volumes = Store("persistentvolumes", core.list_persistent_volume)
    Provisioner(api, claims, volumes, s.state / "volumes").start()
    pods = PodManager(rt)
    pod_store = Store("pods", core.list_pod_for_all_namespaces, [pods.handle])

    service_netns = network.ensure_service_netns(s.network)
    proxy = ServiceProxy(services, slices, {
        (str(s.network.gateway), s.ports.apiserver): ("127.0.0.1", s.ports.apiserver),
    }, service_netns=service_netns, dns_ip=str(s.network.service_host))
    proxy.start()
    kubeletapi.serve(str(s.network.gateway), KUBELET_PORT, s.pki, s.logs / "pods")
    IngressController(api, ingresses, services, slices, s.state / "nginx" / "nginx.conf",
                      s.state / "nginx" / "nginx.pid", s.ports.ingress, s.logs).start(stop)
    for store in (services, slices, ingresses, claims, volumes, pod_store):
        store.start(stop)
    wait_synced([services, slices, ingresses, pod_store])
    registry = NodeRegistry(api, specs)
    threading.Thread(target=registry.heartbeat, args=(stop,), name="heartbeat", daemon=True).start()
    log.info("agent running %d node(s): %s", len(specs), ", ".join(n.name for n in specs))

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    log.info("stopping: terminating pods")
    pods.shutdown(grace=3.0)
    stop.set()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
