"""Pure: a Service port -> the ready addresses behind it, read from EndpointSlices (the
same source kube-proxy, ingress controllers and our gateway use)."""

from __future__ import annotations

SERVICE_LABEL = "kubernetes.io/service-name"


def service_port(service: dict, wanted: int | str) -> dict | None:
    """Find a Service port by number (`port`) or by name."""
    for p in service["spec"].get("ports") or []:
        if (isinstance(wanted, int) and p.get("port") == wanted) or (isinstance(wanted, str) and p.get("name") == wanted):
            return p
    return None


def ready(slices: list[dict], namespace: str, service: str, port_name: str | None) -> list[tuple[str, int]]:
    """(ip, targetPort) of every ready endpoint of the Service port named `port_name`."""
    out: list[tuple[str, int]] = []
    for sl in slices:
        meta = sl["metadata"]
        if meta.get("namespace") != namespace or (meta.get("labels") or {}).get(SERVICE_LABEL) != service:
            continue
        for p in sl.get("ports") or []:
            if (p.get("name") or "") != (port_name or "") or p.get("port") is None:
                continue
            for ep in sl.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                out.extend((addr, int(p["port"])) for addr in ep.get("addresses") or [])
    return sorted(set(out))
