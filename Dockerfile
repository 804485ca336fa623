# syntax=docker/dockerfile:1
#
# One image for both roles of the service; the command picks the role:
#   docker run IMAGE gateway      HTTP on 8000 (/healthz /readyz /metrics), gRPC on 50051
#   docker run IMAGE worker       the Redis-queue worker, /metrics and /healthz on 9400
#
# Two variants, chosen by the build argument VARIANT:
#   docker build --build-arg VARIANT=cpu  -t ldm-service:cpu  .   (python:3.11-slim, CPU build of torch)
#   docker build --build-arg VARIANT=cuda -t ldm-service:cuda .   (NVIDIA CUDA base, CUDA build of torch)
# The CUDA build of torch carries its own CUDA libraries (cuBLAS, cuDNN, NCCL as pip packages), so the
# CUDA variant starts from NVIDIA's small `base` flavour (the CUDA runtime and the driver hooks for the
# NVIDIA container toolkit), not the multi-GB `runtime`/`cudnn` ones: they would ship everything twice.
# Every setting is an LDM_* environment variable (service/settings.py); docs/operations.md has the rest.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# -- the two bases: a Python interpreter at /usr/local/bin/python3 or /usr/bin/python3 --------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's Python 3.12 (the project needs 3.11 or newer). Not pinned (DL3008): the archive
# drops superseded versions, so a pin breaks the build; the base image's tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LDM_DEVICE=cuda

# base-cpu or base-cuda, the stages above (hadolint takes the name for an untagged image).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# -- build: a virtual environment with torch (the variant's build) and the project ------------------
FROM base AS build
ARG VARIANT
# The same release as pyproject.toml's pin (a test keeps them equal); TORCH_CUDA picks the CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
RUN python3 -m venv /opt/venv
# torch first, from PyTorch's index for the variant: PyPI's Linux wheel is the CUDA build, and a
# loose requirement would pull it (several GB) into the CPU image.
RUN case "${VARIANT}" in \
        cpu) index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# Everything else from PyPI; torch==TORCH_VERSION is already satisfied by the variant's build.
RUN pip install --no-cache-dir . \
    && python -c "import torch, service.cli.main; print('torch', torch.__version__)"

# -- runtime: the environment, the demo model and a non-root user -----------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="ldm-service" \
      org.opencontainers.image.description="Latent Diffusion inference service: gateway and worker" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ldm.variant="${VARIANT}"
RUN groupadd --system --gid 10001 ldm \
    && useradd --system --uid 10001 --gid ldm --home-dir /app --shell /usr/sbin/nologin ldm
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The bundled demo model (LDM_MODELS defaults to shapes=models/shapes) and the health check.
COPY --chown=root:root models/shapes/ /app/models/shapes/
COPY --chown=root:root deploy/docker/healthcheck.py /app/healthcheck.py
# The package is installed into the venv, not run from a checkout: point the bundled model's lookup
# at /app. In a container both servers listen on every interface.
ENV LDM_DEMO_MODEL=/app/models/shapes \
    LDM_HOST=0.0.0.0 \
    LDM_METRICS_HOST=0.0.0.0 \
    HOME=/app
USER 10001:10001
EXPOSE 8000 50051 9400
# Gateway: GET /healthz. Worker: GET /healthz on the metrics port, served once its models are loaded
# (hence the start period: a Stable Diffusion checkpoint takes tens of seconds to load), 503 while its
# loop is stuck. Kubernetes uses its own probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/venv/bin/python", "/app/healthcheck.py"]
# SIGTERM drains a worker (LDM_DRAIN_GRACE_S) and stops the gateway: give `docker stop` the time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ldm"]
CMD ["gateway"]
