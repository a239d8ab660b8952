"""Pure: ingress routes -> an nginx configuration file.

Buffering is off in both directions and the read timeout is long, so server-sent events
and chunked streams reach the client as the backend writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,=:@%/-]*$")
_SAFE_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class Route:
    """One Ingress path rule, resolved to the backend addresses that are ready now."""

    host: str  # "" = any host
    path: str
    path_type: str  # Prefix | Exact | ImplementationSpecific
    upstream: str  # a name unique per backend Service port
    backends: tuple[str, ...] = ()  # "ip:port"


@dataclass
class _Server:
    host: str
    locations: dict[str, str] = field(default_factory=dict)  # nginx location spec -> upstream


def _location_specs(route: Route) -> list[str]:
    if route.path_type == "Exact":
        return [f"= {route.path}"]
    if route.path == "/" or route.path_type == "ImplementationSpecific":
        return [route.path]
    # Kubernetes Prefix matches whole path segments: /api matches /api and /api/x, not /apix.
    base = route.path.rstrip("/")
    return [f"= {base}", f"{base}/"]


def render(routes: list[Route], port: int, prefix: Path, logs: Path, as_root: bool) -> str:
    """The whole nginx.conf. Routes earlier in the list win over later ones for the same
    host and path; unsafe hosts or paths are skipped (they would inject configuration)."""
    servers: dict[str, _Server] = {"": _Server("")}
    upstreams: dict[str, tuple[str, ...]] = {}
    for r in routes:
        if not _SAFE_PATH.match(r.path) or (r.host and not _SAFE_HOST.match(r.host)):
            continue
        server = servers.setdefault(r.host, _Server(r.host))
        for spec in _location_specs(r):
            server.locations.setdefault(spec, r.upstream)
        upstreams[r.upstream] = r.backends
    lines = [
        "# Written by the localkube node agent from the cluster's Ingress objects; do not edit.",
        *(["user root;"] if as_root else []),
        "worker_processes 1;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {logs / 'nginx-error.log'} warn;",
        "events { worker_connections 1024; }",
        "http {",
        f"  access_log {logs / 'nginx-access.log'};",
        *(f"  {kind}_temp_path {prefix / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "  proxy_buffering off;",
        "  proxy_request_buffering off;",
        "  proxy_cache off;",
        "  proxy_http_version 1.1;",
        '  proxy_set_header Connection "";',
        "  proxy_set_header Host $host;",
        "  proxy_set_header X-Real-IP $remote_addr;",
        "  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "  proxy_set_header X-Forwarded-Proto $scheme;",
        "  proxy_read_timeout 3600s;",
        "  proxy_send_timeout 3600s;",
        "  client_max_body_size 64m;",
    ]
    for name, backends in sorted(upstreams.items()):
        if backends:
            lines += [f"  upstream {name} {{", *(f"    server {b};" for b in backends), "  }"]
    for host, server in servers.items():
        listen = f"127.0.0.1:{port}" + (" default_server" if host == "" else "")
        lines += ["  server {", f"    listen {listen};", f"    server_name {host or '_'};"]
        for spec, upstream in server.locations.items():
            target = f"proxy_pass http://{upstream};" if upstreams.get(upstream) else "return 503;"
            lines += [f"    location {spec} {{ {target} }}"]
        if "/" not in server.locations:
            lines += ["    location / { return 404; }"]
        lines += ["  }"]
    lines += ["}", ""]
    return "\n".join(lines)
