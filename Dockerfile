# tokenrelay server image. CPU by default; for CUDA build FROM a CUDA PyTorch base image and drop
# the constraints file (it pins the CPU torch build).
FROM python:3.11-slim
WORKDIR /app
COPY client/ client/
COPY pyproject.toml ./
COPY server/ server/
COPY engines/ engines/
COPY constraints/ constraints/
RUN pip install --no-cache-dir -c constraints/ci.txt ./client . \
    --extra-index-url https://download.pytorch.org/whl/cpu
EXPOSE 50051
# Readiness and liveness use the standard gRPC health protocol (deploy/kubernetes.yaml).
ENTRYPOINT ["tokenrelay", "serve", "--host", "0.0.0.0", "--port", "50051"]
