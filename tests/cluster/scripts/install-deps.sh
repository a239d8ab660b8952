#!/usr/bin/env bash
# Installs what the local cluster needs beyond Go and Python, only when missing: nginx (the
# ingress stand-in), iproute2 (pod network namespaces), openssl (certificates), util-linux
# (unshare/mount), the node's runtime pieces Go does not build (runc, the CNI plugins in
# /usr/lib/cni, iptables and conntrack for kube-proxy), skopeo (copies the project's images out of
# podman's store a layer at a time, for the real node), and the Python kubernetes client.
set -euo pipefail
PYTHON="${PYTHON:-python3}"

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v ip >/dev/null || missing+=(iproute2)
command -v openssl >/dev/null || missing+=(openssl)
command -v unshare >/dev/null || missing+=(util-linux)
command -v mount >/dev/null || missing+=(mount)
command -v runc >/dev/null || missing+=(runc)
command -v iptables >/dev/null || missing+=(iptables)
command -v conntrack >/dev/null || missing+=(conntrack)
command -v skopeo >/dev/null || missing+=(skopeo)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "cluster-deps: missing ${missing[*]} and not root to apt-get install them" >&2; exit 1
  fi
  echo "[cluster-deps] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${missing[@]}" >/dev/null || apt-get install -y -qq "${missing[@]/nginx-light/nginx}" >/dev/null \
    || { echo "cluster-deps: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
# Debian starts nginx on port 80 when it is installed; the harness runs its own instance.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
fi
if ! "$PYTHON" -c "import kubernetes, yaml" 2>/dev/null; then
  echo "[cluster-deps] pip install kubernetes pyyaml"
  "$PYTHON" -m pip install -q "kubernetes>=30.1" pyyaml || { echo "cluster-deps: pip install kubernetes failed" >&2; exit 1; }
fi
