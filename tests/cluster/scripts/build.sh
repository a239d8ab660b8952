#!/usr/bin/env bash
# Builds the cluster's binaries (etcd, control plane, kubectl, helm, and the node: kubelet,
# kube-proxy, containerd with its runc shim and ctr, crictl, the pause and test images'
# programs, CoreDNS) from the Go module proxy into a cache keyed by version; a binary already there
# is not rebuilt. `build.sh NAME...` builds only those.
# Why a script and not a Makefile rule: one clear failure line, progress while Go compiles,
# and atomic installs (a half-written binary never lands in the cache).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$HERE/versions.env"
CACHE="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
BIN="$CACHE/k8s/$K8S_VERSION/bin"
LOGDIR="$CACHE/k8s/$K8S_VERSION/logs"
mkdir -p "$BIN" "$LOGDIR"

say() { echo "[cluster-build] $*"; }
die() { echo "cluster-build: $*" >&2; exit 1; }

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[ -x "$GO" ] || die "go: Go toolchain not found (need go >= 1.26 on PATH, at /usr/local/go/bin/go, or in \$GO)"
export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=readonly"

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  K8S_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
CONTAINERD_LDFLAGS="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
CONTAINERD_LDFLAGS+=" -X github.com/containerd/containerd/v2/version.Revision=modelfleet"
CRICTL_LDFLAGS="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
# Storage drivers that need C headers or kernel features this node does not use (it runs
# overlayfs or native snapshots only), so containerd builds as a static binary without cgo.
CONTAINERD_TAGS="no_btrfs no_devmapper no_zfs no_aufs"

# build NAME MODULE_DIR PACKAGE LDFLAGS STAMP [TAGS]: compile one binary with a progress
# ticker. With TAGS (even empty: "") the binary is static (CGO_ENABLED=0): the node's
# images hold nothing but that binary, and containerd needs no C library either.
build() {
  local name=$1 moddir=$2 pkg=$3 ldflags=$4 stamp=$5 cgo=1 tags=""
  if [ $# -ge 6 ]; then cgo=0 tags=$6; fi
  if [ ${#ONLY[@]} -gt 0 ] && [[ " ${ONLY[*]} " != *" $name "* ]]; then return 0; fi
  if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/.$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    say "$name: cached ($stamp)"; return 0
  fi
  local log="$LOGDIR/$name.log" start=$SECONDS
  say "$name: building $pkg@$stamp (log: $log)"
  ( cd "$HERE/build/$moddir" && CGO_ENABLED=$cgo exec nice -n 10 "$GO" build -v -trimpath \
      -tags "$tags" -ldflags "$ldflags" -o "$BIN/.$name.tmp" "$pkg" ) >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null && say "$name: $(wc -l <"$log") packages compiled, $((SECONDS - start))s"
  done
  if ! wait "$pid"; then
    rm -f "$BIN/.$name.tmp"
    # The first line that reads like an error, not a package name or a download notice.
    local why
    why="$(grep -v -e '^[A-Za-z0-9./_-]*$' -e '^go: downloading' "$log" | grep -m1 -iE 'error|cannot|fail|disabled|not found|undefined|missing|invalid' \
      || tail -n1 "$log")"
    die "building $name failed: $why (see $log)"
  fi
  mv "$BIN/.$name.tmp" "$BIN/$name"
  echo "$stamp" >"$BIN/.$name.stamp"
  say "$name: done in $((SECONDS - start))s"
}

ONLY=("$@")
total=$SECONDS
build etcd k8s ./cmd/etcd "-s -w" "$K8S_VERSION"
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$c" k8s "k8s.io/kubernetes/cmd/$c" "$K8S_LDFLAGS" "$K8S_VERSION"
done
build helm helm helm.sh/helm/v3/cmd/helm "$HELM_LDFLAGS" "$HELM_VERSION"
# The real node (MODELFLEET_CLUSTER_NODE_KIND=kubelet; ~20 min more on 2 cores), or any of its
# binaries named on the command line. pause and nodeprobe are this repository's own programs
# (build/k8s/cmd): their stamp is a hash of their source, so editing one rebuilds it.
if [ "${MODELFLEET_CLUSTER_NODE_KIND:-agent}" != kubelet ] && [ ${#ONLY[@]} -eq 0 ]; then
  say "all binaries in $BIN ($((SECONDS - total))s); the real node's are built with MODELFLEET_CLUSTER_NODE_KIND=kubelet"
  exit 0
fi
for c in kubelet kube-proxy; do
  build "$c" k8s "k8s.io/kubernetes/cmd/$c" "$K8S_LDFLAGS" "$K8S_VERSION"
done
for c in pause nodeprobe; do
  build "$c" k8s "./cmd/$c" "-s -w" "$(sha256sum <"$HERE/build/k8s/cmd/$c/main.go" | cut -c1-16)" ""
done
for c in containerd containerd-shim-runc-v2 ctr; do
  build "$c" containerd "github.com/containerd/containerd/v2/cmd/$c" "$CONTAINERD_LDFLAGS" "$CONTAINERD_VERSION" "$CONTAINERD_TAGS"
done
build crictl cri-tools sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_LDFLAGS" "$CRI_TOOLS_VERSION"
# CoreDNS with only the plugins the cluster DNS uses (build/coredns/cmd/coredns); static, since
# its image holds nothing else.
build coredns coredns ./cmd/coredns "-s -w -X github.com/coredns/coredns/coremain.GitCommit=modelfleet" \
  "$COREDNS_VERSION-$(sha256sum <"$HERE/build/coredns/cmd/coredns/main.go" | cut -c1-8)" ""
say "all binaries in $BIN ($((SECONDS - total))s)"
