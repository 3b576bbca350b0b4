# syntax=docker/dockerfile:1
# Task-tracking sidecar image.
#   docker build -t ghcr.io/alakai/task-tracking-sidecar:0.1.0 .
# Both stages use the same pinned Python, so the venv's interpreter link stays valid.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: wheel of this repo plus its dependencies, installed into /opt/venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# Every dependency ships manylinux wheels, so no compiler is needed here either.
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels task-tracking-sidecar \
 && /opt/venv/bin/pip uninstall --yes setuptools pip

# --- runtime: the venv only; no compilers, no pip cache, no sources
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="task-tracking-sidecar" \
      org.opencontainers.image.source="https://github.com/alakai/task-tracking-sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=builder /opt/venv /opt/venv
# Numeric user and group: Kubernetes' runAsNonRoot can verify them without /etc/passwd.
USER 10001:10001
EXPOSE 9470
ENTRYPOINT ["task-tracking"]
CMD ["run"]
