"""Inference replicas known to this gateway and what each serves.

Replicas come from settings (static), from ``adapter.loaded`` events and from the
replicas' own announcements (``inference.replica.<id>``: serving or not, loaded and
cached versions, heartbeat interval). A request goes to a usable replica — static, or
announced serving and heard from within 3 heartbeat intervals — preferring one with the
version loaded, then cached, then any (inference loads on demand); among those, the one
with the fewest requests this gateway has outstanding on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2_grpc
from ftops_gateway.multiplexer import MultiplexChannel
from ftops_runtime.server import grpc_options

# A replica silent for this many heartbeat intervals is treated as gone.
SILENT_INTERVALS = 3.0


@dataclass
class Endpoint:
    address: str
    replica_id: str = ""
    loaded: set[str] = field(default_factory=set)
    cached: set[str] = field(default_factory=set)
    outstanding: int = 0
    static: bool = False
    # From announcements; None = never announced (static or adapter.loaded only).
    serving: bool | None = None
    heartbeat_s: float = 0.0
    last_heard: float = 0.0
    # The base model it serves (announced); empty = unknown (static), which fits any.
    base_fingerprint: str = ""
    _channel: grpc.aio.Channel | None = None
    _stub: inference_pb2_grpc.InferenceServiceStub | None = None
    _multiplex: MultiplexChannel | None = None

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._stub is None:
            # No client interceptors on the hot path (they cost more than the rest of the
            # gateway's work per request); the forwarder passes the trace context itself.
            self._channel = grpc.aio.insecure_channel(self.address, options=grpc_options(64))
            self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        return self._stub

    def multiplex(self, metadata: tuple[tuple[str, str], ...]) -> MultiplexChannel:
        """The one stream this gateway sends this replica's requests over."""
        if self._multiplex is None:
            self._multiplex = MultiplexChannel(self.stub(), address=self.address, metadata=metadata)
        return self._multiplex

    def usable(self, now: float) -> bool:
        if self.serving is None:
            return True
        if not self.serving:
            return False
        return self.heartbeat_s <= 0 or now - self.last_heard <= SILENT_INTERVALS * self.heartbeat_s

    def serves_base(self, fingerprint: str) -> bool:
        return not fingerprint or not self.base_fingerprint or fingerprint == self.base_fingerprint

    def preference(self, version_id: str) -> int:
        """0 = loaded, 1 = in the CPU cache, 2 = would load it from scratch."""
        if not version_id or version_id in self.loaded:
            return 0
        return 1 if version_id in self.cached else 2

    @property
    def name(self) -> str:
        return self.replica_id or self.address

    async def close(self) -> None:
        if self._multiplex is not None:
            await self._multiplex.close()
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub, self._multiplex = None, None, None


def _age_s(event: events_pb2.ReplicaAnnounce) -> float:
    sent = event.meta.occurred_at
    if not sent.seconds and not sent.nanos:
        return 0.0
    return max(0.0, time.time() - (sent.seconds + sent.nanos / 1e9))


class EndpointPool:
    def __init__(
        self, static: Iterable[str] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._clock = clock
        for address in static:
            self.add(address).static = True

    def add(self, address: str, version_id: str = "") -> Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(address)
        if version_id:
            endpoint.loaded.add(version_id)
        return endpoint

    def mark_loaded(self, address: str, version_id: str) -> None:
        self.add(address, version_id)

    def announce(self, event: events_pb2.ReplicaAnnounce) -> Endpoint | None:
        """Apply a replica's announcement (the newest one per replica wins)."""
        if not event.endpoint:
            return None
        endpoint = self.add(event.endpoint)
        endpoint.replica_id = event.replica_id
        endpoint.serving = event.serving and event.reason not in ("drain", "stop")
        endpoint.loaded = set(event.loaded_versions)
        endpoint.cached = set(event.cached_versions)
        endpoint.heartbeat_s = event.heartbeat_interval_s
        endpoint.base_fingerprint = event.base_model_fingerprint
        # Heard when it was sent, not when it arrived: a starting gateway reads each
        # replica's last announcement from the stream, and a replica killed minutes ago
        # must not look alive because its last word was just replayed.
        endpoint.last_heard = self._clock() - _age_s(event)
        return endpoint

    @property
    def addresses(self) -> list[str]:
        return list(self._endpoints)

    def get(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def pick(
        self, version_id: str, exclude: Iterable[str] = (), *, base_fingerprint: str = ""
    ) -> Endpoint | None:
        """Best usable replica not in ``exclude`` that serves the version's base model:
        loaded, then cached, then any; fewest outstanding requests; ties go to the first
        known (keeps tests deterministic)."""
        skip = set(exclude)
        now = self._clock()
        usable = [
            e
            for a, e in self._endpoints.items()
            if a not in skip and e.usable(now) and e.serves_base(base_fingerprint)
        ]
        if not usable:
            return None
        return min(usable, key=lambda e: (e.preference(version_id), e.outstanding))

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            await endpoint.close()
