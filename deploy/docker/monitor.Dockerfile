# The ftops monitor service, CPU image (no ML stack: the monitor extra only).
#   docker build -f deploy/docker/monitor.Dockerfile -t ftops/monitor:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY libs ./libs
COPY services ./services
RUN python -m venv /opt/ftops && /opt/ftops/bin/pip install -c constraints.txt ".[monitor]"

FROM python:3.11-slim
COPY --from=build /opt/ftops /opt/ftops
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a number.
RUN useradd --create-home --uid 10001 ftops && mkdir -p /data && chown 10001 /data
USER 10001
ENV PATH=/opt/ftops/bin:$PATH PYTHONUNBUFFERED=1 \
    FTOPS_GRPC_HOST=0.0.0.0 FTOPS_GRPC_PORT=50051
# Prometheus scrape endpoint /metrics.
ENV FTOPS_METRICS_PORT=9464
EXPOSE 50051 9464
HEALTHCHECK --interval=5s --timeout=3s --retries=12 CMD ["python", "-m", "ftops_runtime.healthcheck", "127.0.0.1:50051"]
ENTRYPOINT ["ftops-monitor"]
