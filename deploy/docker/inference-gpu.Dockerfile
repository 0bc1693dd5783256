# The ftops inference service, GPU image with the vLLM backend (FTOPS_BACKEND=vllm).
#   docker build -f deploy/docker/inference-gpu.Dockerfile -t ftops/inference-gpu:0.1.0 .
# vLLM 0.33 brings its own torch (2.14.0, CUDA wheels carrying the CUDA runtime), which
# conflicts with the `ml` extra's CPU pin (torch==2.13.0): the image therefore installs
# the vllm extra plus the ml extra's other packages, never `.[inference]`.
# Versions: constraints-inference-gpu.txt (torch and vLLM at vLLM's, every other package
# as in constraints.txt; deploy/docker/gpu_constraints.py derives it).
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04
FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md deploy/docker/constraints-inference-gpu.txt ./
COPY libs ./libs
COPY services ./services
RUN python3 -m venv /opt/ftops \
    && /opt/ftops/bin/pip install -c constraints-inference-gpu.txt ".[vllm]" \
        "transformers==5.23.0" "peft==0.21.2" "tokenizers>=0.22" "safetensors>=0.5"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ftops /opt/ftops
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a number.
RUN useradd --create-home --uid 10001 ftops && mkdir -p /data /models && chown 10001 /data
USER 10001
# HOME, HF_HOME: caches (Hugging Face, torch, Triton, vLLM) go to the data volume; the
# root filesystem is read-only in Kubernetes.
ENV PATH=/opt/ftops/bin:$PATH PYTHONUNBUFFERED=1 HOME=/data HF_HOME=/data/hf \
    FTOPS_GRPC_HOST=0.0.0.0 FTOPS_GRPC_PORT=50051 \
    FTOPS_BACKEND=vllm FTOPS_DEVICE=cuda
EXPOSE 50051
# vLLM takes minutes to load and compile: probes allow for it (see deploy/k8s).
HEALTHCHECK --interval=10s --timeout=3s --retries=60 CMD ["python", "-m", "ftops_runtime.healthcheck", "127.0.0.1:50051"]
ENTRYPOINT ["ftops-inference"]
