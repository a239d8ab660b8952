"""The API server calls an admission webhook served by a pod (through the Service's
endpoints), as an operator's validating webhook would be called."""

from __future__ import annotations

import base64
import subprocess

import pytest
from localkube.manifests import TEST_IMAGE, deployment
from localkube.testing import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

WEBHOOK = r'''
import http.server, json, ssl
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        obj = review["request"]["object"]
        allowed = (obj.get("data") or {}).get("color") != "red"
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
            "uid": review["request"]["uid"], "allowed": allowed,
            "status": {"message": "red is not allowed by the test webhook"}}}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("/tls/tls.crt", "/tls/tls.key")
srv = http.server.HTTPServer(("0.0.0.0", 8443), H); srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
'''


def _cert(tmp_path, host: str) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a serving certificate for `host`: (ca, cert, key)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-subj", "/CN=webhook-ca", "-days", "1")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "tls.key",
        "-out", "tls.csr", "-subj", f"/CN={host}")
    (tmp_path / "ext").write_text(f"subjectAltName=DNS:{host}\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", "1", "-days", "1",
        "-extfile", "ext", "-out", "tls.crt")
    return tuple((tmp_path / f).read_bytes() for f in ("ca.crt", "tls.crt", "tls.key"))  # type: ignore[return-value]


def test_validating_webhook_in_a_pod_is_called(cluster: LocalCluster, namespace: str, tmp_path) -> None:
    ca, crt, key = _cert(tmp_path, f"guard.{namespace}.svc")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    server = {"name": "guard", "image": TEST_IMAGE, "command": ["python3", "-c", WEBHOOK],
              "ports": [{"name": "https", "containerPort": 8443}],
              "readinessProbe": {"tcpSocket": {"port": 8443}, "periodSeconds": 1},
              "volumeMounts": [{"name": "tls", "mountPath": "/tls"}]}
    cluster.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "guard-tls"}, "type": "kubernetes.io/tls",
         "data": {"tls.crt": b64(crt), "tls.key": b64(key)}},
        deployment("guard", [server], volumes=[{"name": "tls", "secret": {"secretName": "guard-tls"}}]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "guard"},
         "spec": {"selector": {"app": "guard"}, "ports": [{"port": 443, "targetPort": "https"}]}},
        namespace=namespace,
    )
    wait_for(lambda: (d := cluster.get("deployment", "guard", namespace)) and d["status"].get("readyReplicas") == 1,
             90, what="the webhook server to be ready")
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": f"guard-{namespace}"},
        "webhooks": [{
            "name": "guard.localkube.test", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"service": {"namespace": namespace, "name": "guard", "port": 443}, "caBundle": b64(ca)},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        }],
    }
    cluster.apply(config)
    try:
        def red_rejected() -> str | None:
            cm = '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"generateName":"c-"},"data":{"color":"red"}}'
            proc = cluster.kubectl("create", "-n", namespace, "-f", "-", input=cm, check=False)
            return proc.stderr if "red is not allowed" in proc.stderr else None

        wait_for(red_rejected, 30, what="the webhook to reject a red ConfigMap")
        ok = '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"generateName":"c-"},"data":{"color":"blue"}}'
        assert cluster.kubectl("create", "-n", namespace, "-f", "-", input=ok, check=False).returncode == 0
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", f"guard-{namespace}", check=False)
