"""Typed async client for the ftops public APIs (gateway, trainer, registry, monitor)."""

from ftops_client.client import Endpoints, FtopsClient, ReleaseStatus
from ftops_client.errors import FtopsClientError

__all__ = ["Endpoints", "FtopsClient", "FtopsClientError", "ReleaseStatus"]
