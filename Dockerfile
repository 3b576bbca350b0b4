# Task-tracking sidecar image.
#   docker build -t ghcr.io/alakai/task-tracking-sidecar:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
# Behind a TLS-inspecting proxy or a private index, add (both reach the builder stage only):
#     --build-arg PIP_INDEX_URL=https://pypi.example.com/simple \
#     --build-arg CA_BUNDLE="$(cat corporate-ca.pem)"
# No `# syntax=` line: the engine's own Dockerfile frontend, nothing fetched from a registry.
# Every stage starts from the same base, so the venv's interpreter link stays valid.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# --- builder: the locked dependencies (hash-checked) and this repo's wheel, in /opt/venv
FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
# PEM text of certificate authorities pip trusts besides the base's own (a TLS-inspecting
# proxy's, say): public data, written to a file of this stage only.
ARG CA_BUNDLE=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The locked dependencies first, so that a change to the code alone reuses this layer.
COPY requirements.lock requirements-build.lock ./
# /opt/build holds the build tools (pip, setuptools, wheel); /opt/venv is made without pip and
# filled from outside with `pip --python`, so it never holds an installer. Every dependency ships
# manylinux wheels: no compiler here either.
RUN set -eu; \
    if [ -n "$CA_BUNDLE" ]; then \
      { cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; printf '%s\n' "$CA_BUNDLE"; } \
        > /tmp/ca-bundle.pem; \
      export PIP_CERT=/tmp/ca-bundle.pem; \
    fi; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip install --quiet --require-hashes --no-deps -r requirements-build.lock; \
    python3 -m venv --without-pip /opt/venv; \
    /opt/build/bin/pip --python /opt/venv/bin/python install --quiet \
      --require-hashes --no-deps --only-binary :all: -r requirements.lock; \
    rm -f /tmp/ca-bundle.pem
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# This repo's wheel, offline; `pip check` proves the lock covers every dependency it declares.
RUN set -eu; \
    pip=/opt/build/bin/pip; \
    $pip wheel --quiet --no-index --no-deps --no-build-isolation --wheel-dir /wheels .; \
    $pip --python /opt/venv/bin/python install --quiet --no-index --no-deps /wheels/*.whl; \
    $pip --python /opt/venv/bin/python check

# --- runtime-root: the base with every installer removed (the base's pip included)
FROM ${BASE_IMAGE} AS runtime-root
RUN set -eu; \
    rm -rf /usr/local/bin/pip* /usr/local/bin/wheel /usr/bin/pip* \
      /usr/local/lib/python3*/site-packages/pip* \
      /usr/local/lib/python3*/site-packages/setuptools* \
      /usr/local/lib/python3*/site-packages/_distutils_hack \
      /usr/local/lib/python3*/site-packages/distutils-precedence.pth \
      /usr/local/lib/python3*/site-packages/pkg_resources \
      /usr/local/lib/python3*/site-packages/wheel* \
      /usr/local/lib/python3*/ensurepip /usr/lib/python3*/ensurepip \
      /usr/lib/python3/dist-packages/pip* /usr/lib/python3/dist-packages/setuptools* \
      /usr/lib/python3/dist-packages/_distutils_hack /usr/lib/python3/dist-packages/pkg_resources \
      /usr/lib/python3/dist-packages/distutils-precedence.pth \
      /usr/lib/python3/dist-packages/wheel* /usr/share/python-wheels \
      /root/.cache /tmp/* /var/tmp/*

# --- runtime: one flattened layer of that root (so the base's pip is not even in a lower
# layer), plus the venv; no compilers, no caches, no sources, no build arguments
FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/alakai/task-tracking-sidecar
LABEL org.opencontainers.image.title="task-tracking-sidecar" \
      org.opencontainers.image.description="Task events: Redis projection and S3 archive" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=runtime-root / /
COPY --from=builder /opt/venv /opt/venv
# A scratch stage inherits no ENV: the base's PATH and locale, with the venv first. Nothing is
# written at run time (bytecode was compiled at install), so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Numeric user and group: Kubernetes' runAsNonRoot can verify them without /etc/passwd.
USER 10001:10001
EXPOSE 9470
ENTRYPOINT ["task-tracking"]
CMD ["run"]
