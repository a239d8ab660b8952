"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: the API server proxies
GET /containerLogs/<namespace>/<pod>/<container> to the node's InternalIP:10250.

Why not more (exec, attach, port-forward): those need SPDY/WebSocket streaming, and tests
can reach pods directly by IP instead.
"""

from __future__ import annotations

import http.server
import logging
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = b"==== "  # the line container.launch writes before each run


def split_runs(data: bytes) -> list[bytes]:
    """A container's log file -> the output of each run, oldest first."""
    runs: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(MARKER):
            runs.append(b"")
        elif runs:
            runs[-1] += line
        else:
            runs.append(line)
    return runs


def select(data: bytes, previous: bool, tail: int | None, limit: int | None) -> bytes:
    runs = split_runs(data)
    idx = -2 if previous else -1
    chosen = runs[idx] if len(runs) >= (2 if previous else 1) else b""
    if tail is not None:
        lines = chosen.splitlines(keepends=True)
        chosen = b"".join(lines[-tail:]) if tail > 0 else b""
    return chosen[:limit] if limit else chosen


class _Handler(http.server.BaseHTTPRequestHandler):
    logs_dir: Path
    pods_alive: threading.Event

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("kubelet api: " + fmt, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if url.path in ("/healthz", "/healthz/"):
            return self._send(200, b"ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._send(404, b"not supported by the localkube node agent\n")
        ns, pod, container = parts[1:]
        q = urllib.parse.parse_qs(url.query)
        path = self.logs_dir / f"{ns}_{pod}_{container}.log"
        if not path.exists():
            return self._send(404, f"no logs for container {container} of pod {ns}/{pod}\n".encode())
        first = lambda k: q.get(k, [None])[0]  # noqa: E731
        tail = int(first("tailLines")) if first("tailLines") else None
        limit = int(first("limitBytes")) if first("limitBytes") else None
        body = select(path.read_bytes(), first("previous") == "true", tail, limit)
        if first("follow") != "true":
            return self._send(200, body)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        offset = path.stat().st_size
        try:
            while path.exists():  # until the pod's log goes (pod deleted) or the client leaves
                size = path.stat().st_size
                if size > offset:
                    with open(path, "rb") as fh:
                        fh.seek(offset)
                        self.wfile.write(fh.read(size - offset))
                        self.wfile.flush()
                    offset = size
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError, FileNotFoundError):
            pass

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(host: str, port: int, pki: Path, logs_dir: Path) -> http.server.ThreadingHTTPServer | None:
    """Start the API on a daemon thread; None (logged) if it cannot listen."""
    handler = type("Handler", (_Handler,), {"logs_dir": logs_dir})
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        log.error("kubelet API cannot listen on %s:%s: %s (kubectl logs will not work)", host, port, exc)
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "kubelet.crt", pki / "kubelet.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED  # only the API server (its kubelet-client cert) may read logs
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
    log.info("kubelet API (container logs) on https://%s:%s", host, port)
    return server
