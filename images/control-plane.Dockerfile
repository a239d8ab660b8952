# syntax=docker/dockerfile:1
# The control-plane image: `modelfleet operator` and `modelfleet gateway`, without torch or any
# model library (those are imported by the worker only). Build from the repository root:
#   docker build -f images/control-plane.Dockerfile -t modelfleet/control-plane:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/modelfleet
COPY images/control-plane.requirements.txt /tmp/requirements.txt
RUN /opt/modelfleet/bin/pip install --no-cache-dir -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelfleet/ modelfleet/
COPY operator/ operator/
COPY gateway/ gateway/
COPY worker/ worker/
# --no-deps: pyproject.toml's dependencies include the model stack; the list above is what
# the operator and gateway import (tests/unit/chart/test_images.py checks that).
RUN /opt/modelfleet/bin/pip install --no-cache-dir --no-deps . \
    && /opt/modelfleet/bin/pip uninstall --yes pip setuptools \
    && find /opt/modelfleet -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modelfleet control plane" \
      org.opencontainers.image.description="ModelDeployment operator and OpenAI-compatible gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/modelfleet /opt/modelfleet
ENV PATH=/opt/modelfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The chart runs it as 65532 with a read-only root filesystem and an emptyDir on /tmp.
USER 65532:65532
EXPOSE 8000 8080 9090
ENTRYPOINT ["modelfleet"]
CMD ["gateway", "--discovery", "kubernetes", "--host", "0.0.0.0"]
