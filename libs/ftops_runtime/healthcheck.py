"""``python -m ftops_runtime.healthcheck HOST:PORT [SERVICE]``: exit 0 when the gRPC
health service says SERVING. For container healthchecks and exec probes, so images need
no extra probe binary."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
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
    sys.exit(0 if check(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "") else 1)


if __name__ == "__main__":
    main()
