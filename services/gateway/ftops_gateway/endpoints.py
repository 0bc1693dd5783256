"""Inference replicas known to this gateway and what each has loaded.

Replicas come from settings (static) and from ``adapter.loaded`` events. A request goes
to the least busy replica that already has its version loaded; if none has, to the least
busy replica of all (inference loads versions on demand).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from ftops.inference.v1 import inference_pb2_grpc
from ftops_runtime import client


@dataclass
class Endpoint:
    address: str
    loaded: set[str] = field(default_factory=set)
    outstanding: int = 0
    _channel: grpc.aio.Channel | None = None
    _stub: inference_pb2_grpc.InferenceServiceStub | None = None

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._stub is None:
            self._channel = client.channel(self.address)
            self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None


class EndpointPool:
    def __init__(self, static: Iterable[str] = ()) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        for address in static:
            self.add(address)

    def add(self, address: str, version_id: str = "") -> Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(address)
        if version_id:
            endpoint.loaded.add(version_id)
        return endpoint

    def mark_loaded(self, address: str, version_id: str) -> None:
        self.add(address, version_id)

    @property
    def addresses(self) -> list[str]:
        return list(self._endpoints)

    def pick(self, version_id: str, exclude: Iterable[str] = ()) -> Endpoint | None:
        """Fewest outstanding requests among replicas with the version loaded, else among
        all; ties go to the first known (stable order keeps tests deterministic)."""
        skip = set(exclude)
        usable = [e for a, e in self._endpoints.items() if a not in skip]
        if not usable:
            return None
        loaded = [e for e in usable if version_id and version_id in e.loaded]
        pool = loaded or usable
        return min(pool, key=lambda e: e.outstanding)

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            await endpoint.close()
