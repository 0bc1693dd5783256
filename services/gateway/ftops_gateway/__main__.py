"""``ftops-gateway``: run one gateway replica."""

from __future__ import annotations

from ftops_gateway.service import serve
from ftops_gateway.settings import GatewaySettings
from ftops_runtime.app import run_service


def main() -> None:
    run_service("gateway", GatewaySettings, serve)


if __name__ == "__main__":
    main()
