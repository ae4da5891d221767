# syntax=docker/dockerfile:1.7
# The slim CPU image: curation, evaluation and registry steps (every KFP component by default),
# and, as target `mlflow-server`, the tracking server (Postgres driver + S3 client on top).
#
# Why this shape: one builder stage installs the repo once, editable at /opt/dinoflow (presets are
# read from configs/ next to the package), with the project's own pins: `-c constraints.txt` and
# the extras of pyproject.toml, never a second list. The runtime stages copy the venv and the
# source and run as an unprivileged user (uid 1000; Debian bookworm has no user of that id). The
# `cpu` target adds g++ (as scripts/setup.sh does): torch.compile's CPU backend builds C++ against
# Python.h, which the python image already ships (/usr/local/include); without a compiler every
# compile the presets ask for falls back to eager. The tracking server compiles nothing.
#
#   docker build -f infra/docker/cpu.Dockerfile -t ghcr.io/dinoflow/dinoflow-cpu:0.1.0 .
#   docker build -f infra/docker/cpu.Dockerfile --target mlflow-server \
#     -t ghcr.io/dinoflow/dinoflow-mlflow:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}
RUN python -m venv /opt/venv
WORKDIR /opt/dinoflow
# torch first, as the CPU wheel at the version constraints.txt pins (PyPI's default is the CUDA build)
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch
COPY . .
RUN pip install -c constraints.txt -e . \
    && pip check

FROM builder AS server-builder
RUN pip install -c constraints.txt -e ".[server]"

FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/dinoflow
RUN groupadd --gid 1000 dinoflow \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin dinoflow
WORKDIR /opt/dinoflow
LABEL org.opencontainers.image.source="https://github.com/dinoflow/dinoflow" \
      org.opencontainers.image.licenses="Apache-2.0"

FROM base AS mlflow-server
COPY --from=server-builder /opt/venv /opt/venv
COPY --from=server-builder /opt/dinoflow /opt/dinoflow
USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]

FROM base AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/dinoflow /opt/dinoflow
USER 1000:1000
CMD ["dinoflow", "--help"]
