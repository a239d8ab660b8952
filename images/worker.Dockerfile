# syntax=docker/dockerfile:1
# The worker image: `modelfleet worker` with torch and transformers, for CPUs. Build from the
# repository root (images/build.sh does, with a local Python base):
#   docker build -f images/worker.Dockerfile -t modelfleet/worker:0.1.0 .
# torch comes from PyPI without the CUDA pieces a CPU never loads (see
# images/worker.torch.requirements.txt); for GPUs build on a CUDA base and install torch with
# all its dependencies. A base without Python (the CUDA images) gets the distribution's python3.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install --yes --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The dependencies, in a stage that never sees the project's source, so that a code change
# reuses it, and that the image is built on (no copy of its 3 GB to hash or write again). The
# project goes into /opt/modelfleet-app, joined to sys.path by a .pth file. pip runs from a
# throwaway venv in /tmp that each RUN removes: the image carries no pip. pip compiles bytecode
# as it installs: on the chart's read-only root, with PYTHONDONTWRITEBYTECODE, nothing can cache
# it later, and without it every worker start imports torch and transformers from source
# (8.5 to 11.4 s here against 5.6 s from bytecode), which a scale from zero waits for.
# (python -I: in /src the project's operator/ would shadow the standard library's.)
FROM base AS deps
RUN python3 -m venv --without-pip /opt/modelfleet \
    && /opt/modelfleet/bin/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'modelfleet-app.pth').write_text('/opt/modelfleet-app\n')"
COPY images/worker.torch.requirements.txt /tmp/torch.txt
# torch and the CUDA libraries it links, less the files a CPU never loads (1.1 GB; see the list):
# cuDNN's engine libraries (libcudnn.so.9 opens them on a GPU only), NVSHMEM's device bitcode,
# the profiler's libraries, headers and static archives.
RUN python3 -I -m venv /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/modelfleet/bin/python install --no-cache-dir --disable-pip-version-check \
        --no-deps -r /tmp/torch.txt \
    && rm -rf /opt/modelfleet/lib/python3*/site-packages/nvidia/*/include \
        /opt/modelfleet/lib/python3*/site-packages/nvidia/*/lib/*.a \
        /opt/modelfleet/lib/python3*/site-packages/nvidia/cudnn/lib/libcudnn_?*.so.* \
        /opt/modelfleet/lib/python3*/site-packages/nvidia/nvshmem/lib/*.bc \
        /opt/modelfleet/lib/python3*/site-packages/nvidia/cu13/lib/libnvperf_* \
    && rm -rf /tmp/pip
COPY images/worker.requirements.txt /tmp/requirements.txt
RUN python3 -I -m venv /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/modelfleet/bin/python install --no-cache-dir --disable-pip-version-check \
        --no-deps -r /tmp/requirements.txt \
    && rm -rf /tmp/pip

FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelfleet/ modelfleet/
COPY operator/ operator/
COPY gateway/ gateway/
COPY worker/ worker/
RUN python3 -I -m venv /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/modelfleet/bin/python install --no-cache-dir --disable-pip-version-check \
        --no-deps --target /opt/modelfleet-app . \
    && rm -rf /tmp/pip

FROM deps
LABEL org.opencontainers.image.title="modelfleet worker" \
      org.opencontainers.image.description="Continuous-batching OpenAI-compatible model server" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/modelfleet-app /opt/modelfleet-app
# hf:// sources download into HF_HOME; the operator mounts an emptyDir there.
ENV PATH=/opt/modelfleet-app/bin:/opt/modelfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/modelfleet/hf
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["modelfleet"]
CMD ["worker", "--help"]
