"""``python -m ftops_runtime.healthcheck HOST:PORT [SERVICE]``: exit 0 when the gRPC
health service says SERVING. For container healthchecks and exec probes, so images need
no extra probe binary. Speaks TLS when the process's ``FTOPS_TLS_*`` settings (the
service's own, in its container) configure it: the server's certificate must then name
the address probed (``127.0.0.1`` / ``localhost`` for a probe inside the container)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftops_runtime.settings import ServiceSettings
from ftops_runtime.tls import ClientTls, TlsConfigError
from ftops_runtime.tls import load as load_tls


def _open(address: str, tls: ClientTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials())


def check(
    address: str, service: str = "", timeout: float = 2.0, *, tls: ClientTls | None = None
) -> bool:
    with _open(address, tls) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{address}: {status}")
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    if len(sys.argv) not in (2, 3):
        print("usage: python -m ftops_runtime.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        sys.exit(2)
    try:
        tls = load_tls(ServiceSettings()).client
    except TlsConfigError as exc:
        print(f"{sys.argv[1]}: {exc}", file=sys.stderr)
        sys.exit(1)
    service = sys.argv[2] if len(sys.argv) == 3 else ""
    sys.exit(0 if check(sys.argv[1], service, tls=tls) else 1)


if __name__ == "__main__":
    main()
