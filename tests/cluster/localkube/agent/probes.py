"""Readiness, liveness and startup probes (httpGet, tcpSocket, exec) with the kubelet's
timing rules: initialDelaySeconds, periodSeconds, timeoutSeconds and the success/failure
thresholds."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

ExecFn = Callable[[list[str], float], int]


def resolve_port(port: Any, container: dict) -> int:
    """A probe port may be a number or the name of one of the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def check(probe: dict, container: dict, pod_ip: str, exec_fn: ExecFn) -> bool:
    """Run one probe once; True means success."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            return _http(probe["httpGet"], container, pod_ip, timeout)
        if "tcpSocket" in probe:
            port = resolve_port(probe["tcpSocket"]["port"], container)
            with socket.create_connection((probe["tcpSocket"].get("host") or pod_ip, port), timeout=timeout):
                return True
        if "exec" in probe:
            return exec_fn(list(probe["exec"].get("command") or []), timeout) == 0
        if "grpc" in probe:
            port = int(probe["grpc"]["port"])
            with socket.create_connection((pod_ip, port), timeout=timeout):
                return True  # a stand-in: the port answers
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return True


def _http(spec: dict, container: dict, pod_ip: str, timeout: float) -> bool:
    host = spec.get("host") or pod_ip
    port = resolve_port(spec.get("port", 80), container)
    headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
    headers.setdefault("User-Agent", "kube-probe/1.36")
    if spec.get("scheme", "HTTP").upper() == "HTTPS":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # kubelet does not verify probe certificates either
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", spec.get("path") or "/", headers=headers)
        return 200 <= conn.getresponse().status < 400
    finally:
        conn.close()


class Prober:
    """One probe of one container, across that container's current run."""

    def __init__(self, kind: str, spec: dict | None) -> None:
        self.kind = kind
        self.spec = spec
        self.reset(time.monotonic())

    def reset(self, started: float) -> None:
        """Called whenever the container (re)starts."""
        spec = self.spec or {}
        self.next_due = started + float(spec.get("initialDelaySeconds") or 0)
        self.successes = 0
        self.failures = 0
        # Without a probe the kubelet treats the result as success; with one, readiness and
        # startup start out false (not ready, not started) and liveness starts out passing.
        self.result: bool = self.spec is None or self.kind == "liveness"

    @property
    def active(self) -> bool:
        return self.spec is not None

    def due(self, now: float) -> bool:
        return self.active and now >= self.next_due

    def record(self, ok: bool, now: float) -> bool:
        """Fold one probe outcome into the result; returns the (possibly new) result."""
        spec = self.spec or {}
        self.next_due = now + float(spec.get("periodSeconds") or 10)
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(spec.get("successThreshold") or 1):
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(spec.get("failureThreshold") or 3):
                self.result = False
        return self.result
