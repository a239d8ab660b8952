"""The ingress stand-in routes host/path rules to Services through nginx, and a server-sent
event stream arrives event by event, not buffered to the end."""

from __future__ import annotations

import http.client
import time
import urllib.parse

import pytest
from localkube.manifests import TEST_IMAGE, deployment, service
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

SSE_SERVER = r'''
import http.server, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok"
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(body); return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(5):
            data = f"data: {{\"i\": {i}, \"path\": \"{self.path}\"}}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
            time.sleep(0.5)
        self.wfile.write(b"0\r\n\r\n"); self.wfile.flush()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
'''


def _sse_events(url: str, host: str) -> list[tuple[float, str]]:
    """(arrival time, event) for each `data:` line of the stream at `url`."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", u.path, headers={"Host": host, "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    out = []
    while line := resp.readline():
        if line.startswith(b"data:"):
            out.append((time.monotonic(), line.decode().strip()))
    conn.close()
    return out


def test_ingress_routes_and_streams_sse(cluster: LocalCluster, namespace: str) -> None:
    sse = {"name": "sse", "image": TEST_IMAGE, "command": ["python3", "-c", SSE_SERVER],
           "ports": [{"name": "http", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}
    host = f"{namespace}.example.test"
    ingress = {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "sse"},
        "spec": {"ingressClassName": "nginx", "rules": [{"host": host, "http": {"paths": [
            {"path": "/stream", "pathType": "Prefix",
             "backend": {"service": {"name": "sse", "port": {"number": 80}}}}]}}]},
    }
    cluster.apply(deployment("sse", [sse]), service("sse"), ingress, namespace=namespace)
    base = cluster.ingress_url

    def routed() -> bool:
        try:
            conn = http.client.HTTPConnection(urllib.parse.urlsplit(base).hostname, urllib.parse.urlsplit(base).port, timeout=3)
            conn.request("GET", "/stream/x", headers={"Host": host})
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    wait_for(routed, 90, what="the Ingress route to answer 200")
    events = _sse_events(f"{base}/stream/events", host)
    assert len(events) == 5
    assert '"path": "/stream/events"' in events[0][1]
    spread = events[-1][0] - events[0][0]
    assert spread > 1.5, f"events arrived together ({spread:.2f}s apart): the response was buffered"

    # Other hosts and paths do not reach the Service.
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(base).hostname, urllib.parse.urlsplit(base).port, timeout=3)
    conn.request("GET", "/stream/x", headers={"Host": "other.example.test"})
    assert conn.getresponse().status == 404
    conn.close()
    ing = cluster.get("ingress", "sse", namespace)
    assert ing["status"]["loadBalancer"]["ingress"][0]["ip"] == "127.0.0.1"
