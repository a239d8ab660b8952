"""The ingress stand-in: Ingress objects -> nginx.conf -> nginx reload (SIGHUP).

nginx proxies straight to the ready pod addresses of each backend Service (as ingress-nginx
does), so a readiness change re-renders the file too. Each Ingress's status gets the
loopback address, where tests reach it (INGRESS_URL).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import nginxconf
from . import endpoints
from .runtime import call
from .store import Store

log = logging.getLogger(__name__)

CLASS_NAME = "nginx"
CONTROLLER = "modelfleet.dev/localkube-ingress"


def routes(ingresses: list[dict], services: list[dict], slices: list[dict]) -> list[nginxconf.Route]:
    """Pure: rules of every Ingress, oldest first (as ingress-nginx merges them), default
    backends last."""
    svc_by_key = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
    out: list[nginxconf.Route] = []
    defaults: list[nginxconf.Route] = []

    def route(ns: str, host: str, path: str, path_type: str, backend: dict) -> nginxconf.Route | None:
        ref = backend.get("service")
        if not ref:
            return None
        svc = svc_by_key.get((ns, ref["name"]))
        port_ref = ref.get("port") or {}
        wanted = port_ref.get("number") if port_ref.get("number") is not None else port_ref.get("name", "")
        port = endpoints.service_port(svc, wanted) if svc else None
        backends = endpoints.ready(slices, ns, ref["name"], (port or {}).get("name")) if port else []
        upstream = re.sub(r"[^A-Za-z0-9_]", "_", f"{ns}_{ref['name']}_{wanted}")
        return nginxconf.Route(host, path, path_type, upstream, tuple(f"{ip}:{p}" for ip, p in backends))

    for ing in sorted(ingresses, key=lambda i: (i["metadata"].get("creationTimestamp", ""), i["metadata"]["name"])):
        ns, spec = ing["metadata"]["namespace"], ing.get("spec") or {}
        for rule in spec.get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                r = route(ns, rule.get("host") or "", p.get("path") or "/", p.get("pathType") or "Prefix", p["backend"])
                if r:
                    out.append(r)
        if spec.get("defaultBackend"):
            r = route(ns, "", "/", "Prefix", spec["defaultBackend"])
            if r:
                defaults.append(r)
    return out + defaults


class IngressController:
    def __init__(self, api: client.ApiClient, ingresses: Store, services: Store, slices: Store,
                 conf: Path, pidfile: Path, port: int, logs: Path) -> None:
        self.net = client.NetworkingV1Api(api)
        self.ingresses, self.services, self.slices = ingresses, services, slices
        self.conf, self.pidfile, self.port, self.logs = conf, pidfile, port, logs
        self._dirty = threading.Event()

    def start(self, stop: threading.Event) -> None:
        self._ensure_class()
        for s in (self.ingresses, self.services, self.slices):
            s.add_handler(lambda *_: self._dirty.set())
        threading.Thread(target=self._run, args=(stop,), name="ingress", daemon=True).start()
        self._dirty.set()

    def _ensure_class(self) -> None:
        body = {"metadata": {"name": CLASS_NAME, "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
                "spec": {"controller": CONTROLLER}}
        try:
            self.net.create_ingress_class(body)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("creating IngressClass %s: %s", CLASS_NAME, exc.reason)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self._dirty.wait(1):
                continue
            stop.wait(0.2)  # let a burst of changes settle into one reload
            self._dirty.clear()
            try:
                self.sync()
            except Exception:
                log.exception("ingress sync failed")

    def sync(self) -> None:
        ings = self.ingresses.items()
        text = nginxconf.render(routes(ings, self.services.items(), self.slices.items()), self.port,
                                self.conf.parent, self.logs, os.geteuid() == 0)
        if not self.conf.exists() or self.conf.read_text() != text:
            self.conf.write_text(text)
            self._reload()
        for ing in ings:
            lb = ((ing.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if not any(i.get("ip") == "127.0.0.1" for i in lb):
                meta = ing["metadata"]
                try:
                    lb = {"ingress": [{"ip": "127.0.0.1", "ports": [{"port": self.port, "protocol": "TCP"}]}]}
                    call(self.net.patch_namespaced_ingress_status, meta["name"], meta["namespace"],
                         {"status": {"loadBalancer": lb}})
                except ApiException as exc:
                    log.warning("ingress status %s: %s", meta["name"], exc.reason)

    def _reload(self) -> None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
            log.info("nginx reloaded (%s)", self.conf)
        except (OSError, ValueError) as exc:
            log.warning("cannot reload nginx: %s", exc)
