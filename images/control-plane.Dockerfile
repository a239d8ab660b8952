# syntax=docker/dockerfile:1
# The control-plane image: `modelfleet operator` and `modelfleet gateway`, without torch or any
# model library (those are imported by the worker only). Build from the repository root
# (images/build.sh does, with a local Python base):
#   docker build -f images/control-plane.Dockerfile -t modelfleet/control-plane:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# The dependencies, in a stage that never sees the project's source, so that a code change
# reuses it, and that the image is built on. The project goes into /opt/modelfleet-app, joined
# to sys.path by a .pth file. pip runs from a throwaway venv in /tmp that each RUN removes: the
# image carries no pip. pip compiles bytecode as it installs, as for the worker image: the
# read-only root caches none later.
# (python -I: in /src the project's operator/ would shadow the standard library's.)
FROM ${PYTHON_IMAGE} AS deps
RUN python -m venv --without-pip /opt/modelfleet \
    && /opt/modelfleet/bin/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'modelfleet-app.pth').write_text('/opt/modelfleet-app\n')"
COPY images/control-plane.requirements.txt /tmp/requirements.txt
RUN python -I -m venv /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/modelfleet/bin/python install --no-cache-dir --disable-pip-version-check \
        -r /tmp/requirements.txt \
    && rm -rf /tmp/pip

FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelfleet/ modelfleet/
COPY operator/ operator/
COPY gateway/ gateway/
COPY worker/ worker/
# --no-deps: pyproject.toml's dependencies include the model stack; the list above is what
# the operator and gateway import (tests/unit/chart/test_images.py checks that).
RUN python -I -m venv /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/modelfleet/bin/python install --no-cache-dir --disable-pip-version-check \
        --no-deps --target /opt/modelfleet-app . \
    && rm -rf /tmp/pip

FROM deps
LABEL org.opencontainers.image.title="modelfleet control plane" \
      org.opencontainers.image.description="ModelDeployment operator and OpenAI-compatible gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/modelfleet-app /opt/modelfleet-app
ENV PATH=/opt/modelfleet-app/bin:/opt/modelfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The chart runs it as 65532 with a read-only root filesystem and an emptyDir on /tmp.
USER 65532:65532
EXPOSE 8000 8080 9090
ENTRYPOINT ["modelfleet"]
CMD ["gateway", "--discovery", "kubernetes", "--host", "0.0.0.0"]
