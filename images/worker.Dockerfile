# syntax=docker/dockerfile:1
# The worker image: `modelfleet worker` with torch and transformers. CPU by default; for GPUs
# build on a CUDA base with the matching torch wheels, e.g.
#   docker build -f images/worker.Dockerfile -t modelfleet/worker:0.1.0 .
#   docker build -f images/worker.Dockerfile -t modelfleet/worker:0.1.0-cu128 \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# A base without Python (the CUDA images) gets the distribution's python3 (>= 3.10).
ARG BASE_IMAGE=python:3.11.7-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install --yes --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/modelfleet \
    && /opt/modelfleet/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY images/worker.requirements.txt /tmp/requirements.txt
RUN /opt/modelfleet/bin/pip install --no-cache-dir -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelfleet/ modelfleet/
COPY operator/ operator/
COPY gateway/ gateway/
COPY worker/ worker/
RUN /opt/modelfleet/bin/pip install --no-cache-dir --no-deps . \
    && /opt/modelfleet/bin/pip uninstall --yes pip setuptools \
    && find /opt/modelfleet -name __pycache__ -type d -prune -exec rm -rf {} +

FROM base
LABEL org.opencontainers.image.title="modelfleet worker" \
      org.opencontainers.image.description="Continuous-batching OpenAI-compatible model server" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/modelfleet /opt/modelfleet
# hf:// sources download into HF_HOME; the operator mounts an emptyDir there.
ENV PATH=/opt/modelfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/modelfleet/hf
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["modelfleet"]
CMD ["worker", "--help"]
