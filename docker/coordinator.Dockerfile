# syntax=docker/dockerfile:1
# The DSO coordinator: `pip install '.[coordinator,csip]'` (cvxpy and Clarabel; envoy-schema and aiohttp for csip-server). From the
# repository root (docker/README.md):
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/coordinator.Dockerfile -t p2pdoe-coordinator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Wheels for everything: the project's own, and the pinned dependencies (binary wheels only, so a
# platform without one fails here instead of needing a compiler).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CONSTRAINT=/src/docker/constraints.txt
WORKDIR /src
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY p2pdoe p2pdoe
COPY edge_agent edge_agent
COPY dso_coordinator dso_coordinator
COPY meter_sim meter_sim
RUN pip wheel --only-binary=:all: --wheel-dir /wheels '.[coordinator,csip]' \
    && cp docker/constraints.txt /wheels/

FROM ${PYTHON_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="p2pdoe-coordinator" \
      org.opencontainers.image.description="p2pdoe DSO coordinator (dso-coordinator)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    P2PDOE_DSO_HEALTH_FILE=/tmp/p2pdoe-health
RUN groupadd --gid "${UID}" p2pdoe \
    && useradd --no-log-init --uid "${UID}" --gid p2pdoe --home-dir /data --create-home \
       --shell /usr/sbin/nologin p2pdoe
# From the builder's wheels only (no index); the test suites of numpy, scipy, osqp and cvxpy are dropped.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --constraint=/wheels/constraints.txt 'p2pdoe[coordinator,csip]' \
    && find /usr/local/lib/python3.11/site-packages/numpy /usr/local/lib/python3.11/site-packages/scipy \
       /usr/local/lib/python3.11/site-packages/osqp /usr/local/lib/python3.11/site-packages/cvxpy \
       -type d -name tests -prune -exec rm -rf {} +
WORKDIR /data
USER ${UID}:${UID}
# Healthy while the coordinator is connected to its broker: it touches the file every 5 s.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "p2pdoe.services.health", "/tmp/p2pdoe-health", "60", "--connected"]
CMD ["dso-coordinator"]
