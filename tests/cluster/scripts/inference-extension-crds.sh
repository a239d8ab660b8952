#!/usr/bin/env bash
# Fetches the Gateway API Inference Extension's CRDs (InferencePool, inference.networking.k8s.io)
# from its Go module, sigs.k8s.io/gateway-api-inference-extension at INFERENCE_EXTENSION_VERSION
# (versions.env), through the Go module proxy into the cache; prints the CRD directory last.
# Why the Go module: it is the release the CRDs are cut from, reachable where GitHub is not, and
# checked against the Go checksum database. A version already in the cache is not fetched again.
# Usage: inference-extension-crds.sh [VERSION]; then kubectl apply -f "$(... | tail -n1)".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$HERE/versions.env"
VERSION="${1:-$INFERENCE_EXTENSION_VERSION}"
MODULE=sigs.k8s.io/gateway-api-inference-extension
CACHE="${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}"
OUT="$CACHE/inference-extension/$VERSION/crds"

say() { echo "[inference-extension] $*" >&2; }
die() { echo "inference-extension-crds: $*" >&2; exit 1; }

if compgen -G "$OUT/*.yaml" >/dev/null; then
  say "CRDs of $MODULE@$VERSION: cached"
  echo "$OUT"
  exit 0
fi
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[ -x "$GO" ] || die "go: Go toolchain not found (need go on PATH, at /usr/local/go/bin/go, or in \$GO)"

# The module cache under ours, so that the whole fetch lives (and is cleaned) with the cache.
export GOMODCACHE="$CACHE/go-mod" GOTOOLCHAIN=local GOFLAGS=-mod=mod
say "fetching $MODULE@$VERSION through the Go module proxy (about 1.3 MB)"
start=$SECONDS
# -x prints each request as it starts and ends: the progress of the download.
json="$(cd "$(mktemp -d)" && "$GO" mod download -x -json "$MODULE@$VERSION")" || {
  why="$(printf '%s' "$json" | sed -n 's/.*"Error": "\(.*\)".*/\1/p' | head -n1)"
  die "fetching $MODULE@$VERSION failed: ${why:-see the lines above}"
}
dir="$(printf '%s' "$json" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p' | head -n1)"
compgen -G "$dir/config/crd/bases/*.yaml" >/dev/null || die "$MODULE@$VERSION has no config/crd/bases/*.yaml"
tmp="$OUT.tmp.$$"
mkdir -p "$tmp"
cp "$dir"/config/crd/bases/*.yaml "$tmp/"
chmod -R u+w "$tmp"
rm -rf "$OUT" && mv "$tmp" "$OUT"
say "CRDs in $OUT ($(ls "$OUT" | wc -l) files, $((SECONDS - start))s)"
echo "$OUT"
