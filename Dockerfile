# syntax=docker/dockerfile:1
#
# The resilience sidecar image. Build:   docker build -t ai-resilience-sidecar:0.1.0 .
# Run (beside a model on the host):     docker run --rm --read-only -p 127.0.0.1:8700:8700 \
#     -e SIDECAR_UPSTREAM_URL=http://host.docker.internal:8080 ai-resilience-sidecar:0.1.0
#
# The build stage turns requirements.lock (pinned, sha256-checked) into wheels, builds the
# project's own wheel and installs them all into /opt/sidecar without an index. The runtime stage
# copies only that virtualenv onto the same slim base (no compiler, no pip in the virtualenv) and
# runs it as UID 10001 with a read-only root; state lives only under /var/lib/sidecar.
# Regenerate the lock with scripts/lock.sh after changing pyproject.toml dependencies.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.lock ./
# Hash-checking mode: any file whose sha256 is not in the lock is refused. Binary wheels only, so
# nothing is compiled here either.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip wheel --require-hashes --only-binary=:all: --wheel-dir /wheels \
        -r requirements.lock \
 && /opt/build/bin/pip install --no-index --find-links /wheels setuptools wheel
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# The project's own wheel, built with the locked backend (no build isolation: nothing is fetched),
# then the runtime virtualenv: --without-pip, no index, only the wheels above.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/sidecar \
 && /opt/build/bin/pip --python /opt/sidecar/bin/python install --no-index --find-links /wheels \
        ai-resilience-sidecar

FROM ${PYTHON_IMAGE} AS runtime
ARG SIDECAR_UID=10001
LABEL org.opencontainers.image.title="ai-resilience-sidecar" \
      org.opencontainers.image.description="A resilience sidecar for AI model servers" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric, non-root user with no shell and no home; the state directory is the only place it
# can write, so the image runs with a read-only root filesystem.
RUN groupadd --system --gid "${SIDECAR_UID}" sidecar \
 && useradd --system --uid "${SIDECAR_UID}" --gid "${SIDECAR_UID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
 && install -d -o "${SIDECAR_UID}" -g "${SIDECAR_UID}" -m 0750 /var/lib/sidecar \
 && install -d -m 0755 /etc/sidecar/policies
COPY --from=build /opt/sidecar /opt/sidecar
COPY policies/ /etc/sidecar/policies/
COPY deploy/docker/healthcheck.py /opt/sidecar/healthcheck.py
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_POLICY=/etc/sidecar/policies/default.yaml \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8700 \
    SIDECAR_ADMIN_HOST=0.0.0.0 \
    SIDECAR_ADMIN_PORT=8701 \
    SIDECAR_STATE_DIR=/var/lib/sidecar \
    SIDECAR_LOG_FORMAT=json
VOLUME ["/var/lib/sidecar"]
USER ${SIDECAR_UID}:${SIDECAR_UID}
WORKDIR /var/lib/sidecar
EXPOSE 8700 8701
HEALTHCHECK --interval=10s --timeout=4s --start-period=10s --retries=3 \
    CMD ["python", "/opt/sidecar/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar", "run"]
