# dpo-recipe on a CUDA PyTorch image: `make docker` builds it; see README "Docker" for `docker run --gpus all ...`.
# Linted by hadolint in the test suite (tests/test_docker.py); not built in CI (no Docker daemon there).
# The tests ran on torch 2.13 (CPU); any CUDA PyTorch image >= 2.4 serves: make docker BASE_IMAGE=pytorch/pytorch:<tag>
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The Makefile's $(VENV)/bin/python and accelerate are the image's own; the hub cache lives on a mounted volume.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VENV=/opt/conda \
    HF_HOME=/cache/huggingface

# `make` runs the recipe's targets; the base image's Ubuntu decides its version, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so a code change does not reinstall them. The image's CUDA torch satisfies torch>=2.4.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
COPY configs ./configs
COPY recipes ./recipes
COPY scripts ./scripts
COPY Makefile ./

VOLUME ["/app/checkpoints", "/cache/huggingface"]
CMD ["make", "smoke"]
