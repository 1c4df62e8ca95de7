# syntax=docker/dockerfile:1
# agent-sidecar: the image's entrypoint is the sidecar, the agent is the command.
#
#   docker build -t agent-sidecar:dev .
#   docker run --rm -e REDIS_URL=redis://host:6379/0 agent-sidecar:dev python my_agent.py
#
# In Kubernetes the agent's command is the Job container's `args` (see k8s/base/agent/job.yaml);
# every sidecar option is set through its environment variable (see README, Configuration).

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the project's wheel plus wheels of all its dependencies, from pyproject.toml ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A C compiler for the native module (sidecar/_speedups.c); without one the wheel is built
# without it and the sidecar runs its Python code. Debian's gcc of the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY agent_wrapper/ agent_wrapper/
COPY sidecar/ sidecar/
# Only wheels leave this stage; the build environment (setuptools, pip's cache) stays behind.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .
# The image's first process: it blocks the signals the sidecar takes over and execs Python.
# PID 1 without a handler loses a SIGTERM (the kernel drops it), and the interpreter starts
# for tens of milliseconds before sidecar/__main__.py can block it; blocked, it stays pending.
COPY docker/sidecar-init.c ./
RUN gcc -O2 -Wall -o /sidecar-init sidecar-init.c

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_SPOOL_DIR=/var/spool/agent-sidecar

# Install from the builder's wheels only (no index, no compiler, no cache left in the image),
# then the unprivileged user and the spool directory it owns.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/sidecar-init,target=/tmp/sidecar-init \
    install -m 0755 /tmp/sidecar-init /usr/local/bin/sidecar-init \
    && pip install --no-cache-dir --no-index --find-links=/wheels /wheels/agent_sidecar-*.whl \
    && groupadd --system --gid 10001 agent \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/agent \
        --shell /usr/sbin/nologin agent \
    && mkdir -p /var/spool/agent-sidecar \
    && chown 10001:10001 /var/spool/agent-sidecar \
    && chmod 0750 /var/spool/agent-sidecar

WORKDIR /home/agent
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# The sidecar runs as PID 1 (sidecar-init execs it): it forwards signals to the agent and
# reaps orphans, so no other init process is needed. Everything after "--" is the agent's command.
ENTRYPOINT ["/usr/local/bin/sidecar-init", "python", "-P", "-m", "sidecar", "--"]
CMD ["python", "-c", "print('no agent command given')"]
