# The ftops trainer service, GPU image (jobs run on it with `device: cuda` in their spec):
# the same trainer extra, with torch 2.13.0 from PyPI, whose Linux wheels are the CUDA
# build (they carry the CUDA runtime; the node's driver comes in through the NVIDIA
# container toolkit).
# Versions: constraints-trainer-gpu.txt (constraints.txt's, derived by gpu_constraints.py).
#   docker build -f deploy/docker/trainer-gpu.Dockerfile -t ftops/trainer-gpu:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md deploy/docker/constraints-trainer-gpu.txt ./
COPY libs ./libs
COPY services ./services
RUN python -m venv /opt/ftops && /opt/ftops/bin/pip install -c constraints-trainer-gpu.txt ".[trainer]"

FROM python:3.11-slim
COPY --from=build /opt/ftops /opt/ftops
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a number.
RUN useradd --create-home --uid 10001 ftops && mkdir -p /data /models && chown 10001 /data
USER 10001
# HOME, HF_HOME: caches (Hugging Face, torch, Triton, vLLM) go to the data volume; the
# root filesystem is read-only in Kubernetes.
ENV PATH=/opt/ftops/bin:$PATH PYTHONUNBUFFERED=1 HOME=/data HF_HOME=/data/hf \
    FTOPS_GRPC_HOST=0.0.0.0 FTOPS_GRPC_PORT=50051 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=3s --retries=24 CMD ["python", "-m", "ftops_runtime.healthcheck", "127.0.0.1:50051"]
ENTRYPOINT ["ftops-trainer"]
