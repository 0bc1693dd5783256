# The ftops gateway service, CPU image (no ML stack: the gateway extra only).
#   docker build -f deploy/docker/gateway.Dockerfile -t ftops/gateway:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY libs ./libs
COPY services ./services
RUN python -m venv /opt/ftops && /opt/ftops/bin/pip install -c constraints.txt ".[gateway]"

FROM python:3.11-slim
COPY --from=build /opt/ftops /opt/ftops
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a number.
RUN useradd --create-home --uid 10001 ftops && mkdir -p /data && chown 10001 /data
USER 10001
ENV PATH=/opt/ftops/bin:$PATH PYTHONUNBUFFERED=1 \
    FTOPS_GRPC_HOST=0.0.0.0 FTOPS_GRPC_PORT=50051
# The OpenAI-compatible HTTP endpoint (off unless FTOPS_HTTP_PORT is set; on in images).
ENV FTOPS_HTTP_PORT=8080
EXPOSE 50051 8080
HEALTHCHECK --interval=5s --timeout=3s --retries=12 CMD ["python", "-m", "ftops_runtime.healthcheck", "127.0.0.1:50051"]
ENTRYPOINT ["ftops-gateway"]
