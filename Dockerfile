# syntax=docker/dockerfile:1
# ibau as a container step for model-intake pipelines.
#
#   docker build -t ibau .                                   # CUDA image (default target)
#   docker build --target cpu -t ibau:cpu .                  # small CPU-only image
#   docker run --rm --gpus all -v "$PWD:/work" ibau sanitize model.safetensors --clean clean --out fixed.safetensors
#
# The working directory /work is meant to be mounted; the container runs as the non-root user "ibau"
# (uid 10001): pass --user "$(id -u):$(id -g)" so files written into the mount belong to you.

ARG TORCH_VERSION=2.13.0
ARG ORT_GPU_VERSION=1.31.1

# ---------- the package source, copied once into both images ----------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY ibau_cli /src/ibau_cli
COPY configs /src/configs
COPY docker/install.sh /src/docker/install.sh

# ---------- CPU: slim Python, CPU wheels of torch and onnxruntime ----------
FROM python:3.11-slim-bookworm AS cpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/ibau \
    PATH=/opt/ibau/bin:$PATH \
    XDG_CACHE_HOME=/tmp/ibau-cache \
    TORCH_VERSION=${TORCH_VERSION} \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/ibau
COPY --from=source /src /src
RUN sh /src/docker/install.sh cpu /src && rm -rf /src \
    && groupadd --gid 10001 ibau && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin ibau
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["ibau"]
CMD ["--help"]

# ---------- CUDA: NVIDIA runtime base, CUDA torch, onnxruntime-gpu ----------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda
ARG TORCH_VERSION
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/ibau \
    PATH=/opt/ibau/bin:$PATH \
    XDG_CACHE_HOME=/tmp/ibau-cache \
    TORCH_VERSION=${TORCH_VERSION} \
    ORT_GPU_VERSION=${ORT_GPU_VERSION}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/ibau
COPY --from=source /src /src
RUN sh /src/docker/install.sh cuda /src && rm -rf /src \
    && groupadd --gid 10001 ibau && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin ibau
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["ibau"]
CMD ["--help"]
