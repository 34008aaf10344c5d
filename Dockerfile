# Edison on an NVIDIA GPU. Build: docker build -t edison .
# Run:   docker run --gpus all -p 8000:8000 -v /models:/models:ro edison
# Models are never baked in: mount your own folders and point config/edison.yaml at them.
ARG CUDA_VERSION=12.6.3
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake ninja-build git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/edison
ENV PATH=/opt/edison/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY routers ./routers
COPY services ./services
# llama.cpp with CUDA offload; torch pinned in the same install (CUDA build on this base).
RUN CMAKE_ARGS="-DGGML_CUDA=on" FORCE_CMAKE=1 \
    pip install -c constraints.txt "torch==2.13.0" ".[cluster]"
# llama-server (the llama-server worker backend) from the same vendored llama.cpp, same flags.
COPY scripts ./scripts
RUN CMAKE_ARGS="-DGGML_CUDA=on" scripts/build_llama_server.sh /opt/edison \
 && rm -rf var/build

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/edison/bin:$PATH EDISON_CONFIG=/etc/edison/edison.yaml
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 edison \
 && mkdir -p /var/lib/edison/outputs /var/lib/edison/state \
 && chown edison /var/lib/edison/outputs /var/lib/edison/state
COPY --from=build /opt/edison /opt/edison
COPY config/edison.yaml /etc/edison/edison.yaml
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
CMD ["edison", "serve"]
