# syntax=docker/dockerfile:1.7
# The GPU training image: CUDA PyTorch, DeepSpeed (extra `gpu`), optionally xFormers
# (build with --build-arg EXTRAS=gpu,xformers). Used by the PyTorchJob (infra/k8s/training).
#
# Why this shape: the builder installs the repo once, editable at /opt/dinoflow, with the
# project's pins (`-c constraints.txt`, pyproject extras); torch comes from the CUDA index at the
# version constraints.txt pins (`==2.13.0` matches the `+cu128` build). The runtime keeps the CUDA
# *devel* base (nvcc, CUDA headers) and adds a C/C++ compiler and Python's headers (python3-dev, for
# the image's Python 3.12): torch.compile's Triton builds its launcher against Python.h, and
# DeepSpeed's fused ops compile just in time (nvcc, g++, Python.h); without them every compile the
# presets ask for (model.compile_blocks, loss.compile, crops.compile) would fall back to eager.
# It runs as an unprivileged user (uid 1000).
#
#   docker build -f infra/docker/gpu.Dockerfile -t ghcr.io/dinoflow/dinoflow-gpu:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG EXTRAS=gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH} \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /opt/dinoflow
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX}" -c constraints.txt torch
COPY . .
RUN pip install -c constraints.txt -e ".[${EXTRAS}]" \
    && pip check

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev g++ libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 images ship user and group `ubuntu` as uid/gid 1000: free the id first (a base
# without that user skips this).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid 1000 dinoflow \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin dinoflow
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/dinoflow
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/dinoflow /opt/dinoflow
WORKDIR /opt/dinoflow
LABEL org.opencontainers.image.source="https://github.com/dinoflow/dinoflow" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 1000:1000
CMD ["dinoflow", "--help"]
