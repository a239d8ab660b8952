"""Certificates and service-account keys for the control plane, made with the openssl CLI.

One CA signs everything: the API server's serving certificate (valid for loopback, the
bridge address pods use, and the `kubernetes` Service names), and a client certificate per
component. ECDSA P-256 keeps generation instant. Made once per state folder and reused.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path


class PkiError(RuntimeError):
    pass


@dataclass(frozen=True)
class Identity:
    """A client certificate: file stem, common name (user) and organisations (groups)."""

    stem: str
    cn: str
    orgs: tuple[str, ...] = ()


CLIENTS = (
    Identity("admin", "kubernetes-admin", ("system:masters",)),
    Identity("controller-manager", "system:kube-controller-manager"),
    Identity("scheduler", "system:kube-scheduler"),
    # The node agent acts for several nodes and also runs the service proxy and ingress, so it
    # is an admin rather than a NodeRestriction-limited kubelet.
    Identity("node-agent", "modelfleet:node-agent", ("system:masters",)),
    Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
    # The real node (node kind `kubelet`): the kubelet as the Node authorizer and
    # NodeRestriction expect it, and kube-proxy as the user the bootstrap RBAC policy binds
    # to system:node-proxier.
    Identity("kubelet-client", "system:node:localkube-0", ("system:nodes",)),
    Identity("kube-proxy", "system:kube-proxy"),
)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path.name, cwd=path.parent)
    path.chmod(0o600)


def _sign(pki: Path, stem: str, subject: str, ext: str) -> None:
    _key(pki / f"{stem}.key")
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", subject, "-out", f"{stem}.csr", cwd=pki)
    (pki / f"{stem}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "3650", "-sha256",
        "-extfile", f"{stem}.ext", "-out", f"{stem}.crt", cwd=pki,
    )
    (pki / f"{stem}.csr").unlink()
    (pki / f"{stem}.ext").unlink()


def _serving(pki: Path, stem: str, cn: str, sans: str) -> None:
    """A serving certificate, re-issued when its SAN list changes (a new pod CIDR must never
    leave pods with a certificate that does not name the bridge)."""
    stamp = pki / f"{stem}.sans"
    if (pki / f"{stem}.crt").exists() and stamp.exists() and stamp.read_text() == sans:
        return
    _sign(
        pki, stem, f"/CN={cn}",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
    )
    stamp.write_text(sans)


def ensure(pki: Path, server_ips: list[str], server_names: list[str], kubelet_ip: str) -> None:
    """Create whatever of the CA, serving certs, client certs and SA key pair is missing."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _key(pki / "ca.key")
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=modelfleet-local-ca",
            "-days", "3650", "-sha256", "-out", "ca.crt", cwd=pki,
        )
    _serving(pki, "apiserver", "kube-apiserver",
             ",".join([f"IP:{ip}" for ip in server_ips] + [f"DNS:{n}" for n in server_names]))
    # The node agent's kubelet API (container logs) serves on the bridge address.
    _serving(pki, "kubelet", "localkube-kubelet", f"IP:{kubelet_ip}")
    for ident in CLIENTS:
        if not (pki / f"{ident.stem}.crt").exists():
            subject = f"/CN={ident.cn}" + "".join(f"/O={o}" for o in ident.orgs)
            _sign(
                pki, ident.stem, subject,
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=clientAuth\n",
            )
    if not (pki / "sa.key").exists():
        _key(pki / "sa.key")
        _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
