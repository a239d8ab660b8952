#!/usr/bin/env bash
# Build every image in images/ with podman, from base images made on this machine:
#
#   bash images/build.sh            # (or `make images`) all images
#   bash images/build.sh worker     # only images/worker.Dockerfile
#
# No container registry is reachable where modelfleet is built and tested, so the bases that the
# Dockerfiles start from are made here: Debian bookworm (minbase) by debootstrap from the
# machine's configured Debian mirror, imported into podman, and a Python base on top of it
# (Debian's python3, 3.11) that stands in for the Dockerfiles' default Python image. Both are
# cached: the Debian base is made once (IMAGES_REBUILD_BASE=1 makes it again), the Python base
# comes from podman's layer cache.
#
# Each Dockerfile is built with podman's layer cache; the dependency layers do not depend on the
# project's source, so a rebuild after a code change reuses them and takes seconds. Images are
# tagged with the names the chart's pods resolve to (charts/modelfleet/values.yaml's repositories,
# the chart's appVersion as tag, docker.io/ as a kubelet completes a bare name):
#   docker.io/modelfleet/control-plane:<appVersion>, docker.io/modelfleet/worker:<appVersion>,
#   docker.io/modelfleet/vllm-cpu:<appVersion> (vLLM's CPU build; the chart's default vLLM image
#   is vLLM's own, see images/README.md)
#
# pip inside a build trusts the same certificate authorities as the host: the host's CA bundle
# is mounted read-only into each build step (never copied into an image).
#
# Podman runs with images/podman/containers.conf (CONTAINERS_CONF), see there for why. Installs
# podman, runc and debootstrap with apt when missing. Prints `<name> <image>` per built image
# on stdout as the last lines; progress goes to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/podman/containers.conf}

SUITE=bookworm
DEBIAN_IMAGE=localhost/modelfleet/debian:$SUITE
PYTHON_BASE=localhost/modelfleet/python:3.11-$SUITE
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$REPO/charts/modelfleet/Chart.yaml")
CA_BUNDLE=${IMAGES_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
UV_CACHE=${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}  # where uv keeps its cache by default

START=$SECONDS
phase() { printf '[images %4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { phase "ERROR: $*"; exit 1; }

[[ -n $VERSION ]] || die "no appVersion in charts/modelfleet/Chart.yaml"

# ---- tools ------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    phase "installing ${missing[*]} with apt"
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends "${missing[@]}" uidmap >&2
fi

exists() { podman image exists "$1"; }

# ---- Debian base ------------------------------------------------------------------------------
mirror() {
    # The first Debian archive URI in the machine's apt sources (deb822 or one-line format).
    local uri
    uri=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v -- '-security' | head -n1 || true)
    if [[ -z $uri ]]; then
        uri=$(grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if [[ -n ${IMAGES_REBUILD_BASE:-} ]] || ! exists "$DEBIAN_IMAGE"; then
    url=$(mirror)
    root=$(mktemp -d /var/tmp/modelfleet-debootstrap.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    phase "debootstrap --variant=minbase $SUITE from $url (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$root" "$url" >&2 \
        || die "debootstrap failed (see above)"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
    phase "importing $DEBIAN_IMAGE"
    tar --numeric-owner -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >&2
    rm -rf "$root"
    trap - EXIT
else
    phase "cached: $DEBIAN_IMAGE"
fi

# Always built: podman's layer cache makes it a no-op unless python.Containerfile changed.
phase "building $PYTHON_BASE"
podman build --network host --layers -t "$PYTHON_BASE" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
    -f "$HERE/podman/python.Containerfile" "$HERE/podman" >&2

# ---- the project's images -----------------------------------------------------------------------
[[ -r $CA_BUNDLE ]] || die "no CA bundle at $CA_BUNDLE (set IMAGES_CA_BUNDLE)"
wanted=("$@")
built=()
for dockerfile in "$HERE"/*.Dockerfile; do
    name=$(basename "$dockerfile" .Dockerfile)
    if ((${#wanted[@]})) && [[ " ${wanted[*]} " != *" $name "* ]]; then
        continue
    fi
    image=docker.io/modelfleet/$name:$VERSION
    t0=$SECONDS
    phase "building $image from images/$name.Dockerfile"
    args=(--network host --layers -f "$dockerfile" -t "$image"
          -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
    # The Dockerfiles name their base PYTHON_IMAGE (control plane) or BASE_IMAGE (worker).
    for arg in PYTHON_IMAGE BASE_IMAGE; do
        grep -q "^ARG $arg=" "$dockerfile" && args+=(--build-arg "$arg=$PYTHON_BASE")
    done
    # A Dockerfile that installs with uv (vllm-cpu) uses the host's uv cache, mounted read-write
    # into its build steps: what `make vllm` downloaded is not downloaded again.
    if grep -q "^ARG UV_CACHE_DIR=" "$dockerfile"; then
        mkdir -p "$UV_CACHE"
        args+=(-v "$UV_CACHE:/var/cache/host-uv" --build-arg UV_CACHE_DIR=/var/cache/host-uv)
    fi
    [[ -f $dockerfile.dockerignore ]] && args+=(--ignorefile "$dockerfile.dockerignore")
    podman build "${args[@]}" "$REPO" >&2
    size=$(podman image inspect --format '{{.Size}}' "$image")
    phase "built $image in $((SECONDS - t0))s ($((size / 1000000)) MB)"
    built+=("$name $image")
done
((${#built[@]})) || die "no Dockerfile matches: ${wanted[*]}"
phase "done"
printf '%s\n' "${built[@]}"
