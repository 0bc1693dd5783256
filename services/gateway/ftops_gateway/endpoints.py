"""Inference replicas known to this gateway and what each serves.

Replicas come from settings (static), from ``adapter.loaded`` events and from the
replicas' own announcements (``inference.replica.<id>``: serving or not, loaded and
cached versions, heartbeat interval). A request goes to a usable replica — static, or
announced serving and heard from within 3 heartbeat intervals — preferring one with the
version loaded, then cached, then any (inference loads on demand); among those, the one
with the fewest requests this gateway has outstanding on it.

A replica a call just failed on with UNAVAILABLE (killed, restarting, draining) is
*ejected* (passive outlier detection, as Envoy does it): ``pick`` passes it over while
any other usable replica fits the request, so later requests stop paying a failed first
attempt long before its announcements are missed. When only ejected replicas fit, the
best of them is still picked (trying one beats failing outright). An ejection ends when
the replica is heard from again (an announcement *sent* after the ejection; a replayed
older one does not count) or on its own after 3 heartbeat intervals (10 s for a replica
that never announces), so a static replica is retried eventually.

Each replica announces its capacity (``max_concurrent``) and what it has in flight. A
replica's *load* is the larger of that announced figure (up to a heartbeat old, every
gateway's requests) and this gateway's own outstanding requests on it (current). A request
a replica refused for capacity goes only to a replica with room (load below capacity);
best-effort requests (mirrors) only to one below ``BEST_EFFORT_MAX_LOAD`` of it, so that
mirrored traffic backs off before user requests would queue behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from opentelemetry import metrics

from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2_grpc
from ftops_gateway.multiplexer import MultiplexChannel
from ftops_runtime.client import channel
from ftops_runtime.tls import ClientTls

log = logging.getLogger(__name__)

# A replica silent for this many heartbeat intervals is treated as gone; an ejection of an
# announced replica lasts as long at most.
SILENT_INTERVALS = 3.0
# How long an ejection lasts for a replica without a known heartbeat (static, or learnt
# from adapter.loaded only): it is retried after that.
EJECTION_S = 10.0
# Share of a replica's announced capacity beyond which no best-effort request is sent to it.
BEST_EFFORT_MAX_LOAD = 0.75
# After a replica refuses a mirror: no mirrors to it for its retry advice, within these.
BEST_EFFORT_MIN_PAUSE_MS = 50
BEST_EFFORT_MAX_PAUSE_MS = 1000

_ejections = metrics.get_meter("ftops.gateway").create_counter(
    "ftops.gateway.replica_ejections",
    unit="{ejection}",
    description="Replicas passed over after a call to them failed with UNAVAILABLE",
)


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
    # Pool clock time of the last failure that ejected it; None = not ejected.
    ejected_at: float | None = None
    # Announced: generations it runs at once (0 = unknown), and its requests in flight.
    capacity: int = 0
    announced_in_flight: int = 0
    # The CA (and client certificate) to reach it over TLS; None = plaintext.
    tls: ClientTls | None = None
    # Best-effort requests (mirrors) this gateway has in flight on it, and until when
    # (time.monotonic()) it sends none, after the replica refused one with retry advice.
    best_effort_outstanding: int = 0
    best_effort_paused_until: float = 0.0
    _channel: grpc.aio.Channel | None = None
    _stub: inference_pb2_grpc.InferenceServiceStub | None = None
    _multiplex: MultiplexChannel | None = None

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._stub is None:
            # No client interceptors on the hot path (they cost more than the rest of the
            # gateway's work per request); the forwarder passes the trace context itself.
            self._channel = channel(self.address, tls=self.tls, propagate=False)
            self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        return self._stub

    def multiplex(self, metadata: tuple[tuple[str, str], ...]) -> MultiplexChannel:
        """The one stream this gateway sends this replica's requests over."""
        if self._multiplex is None:
            self._multiplex = MultiplexChannel(self.stub(), address=self.address, metadata=metadata)
        return self._multiplex

    def usable(self, now: float, heard_since: float = 0.0) -> bool:
        """Announced serving and heard from lately; silence before ``heard_since`` (when
        this gateway could not hear announcements) does not count against it."""
        if self.serving is None:
            return True
        if not self.serving:
            return False
        last = max(self.last_heard, heard_since)
        return self.heartbeat_s <= 0 or now - last <= SILENT_INTERVALS * self.heartbeat_s

    def ejection_s(self) -> float:
        return SILENT_INTERVALS * self.heartbeat_s if self.heartbeat_s > 0 else EJECTION_S

    def ejected(self, now: float) -> bool:
        if self.ejected_at is None:
            return False
        if now - self.ejected_at < self.ejection_s():
            return True
        self.ejected_at = None  # served its time: tried again
        return False

    def serves_base(self, fingerprint: str) -> bool:
        return not fingerprint or not self.base_fingerprint or fingerprint == self.base_fingerprint

    @property
    def load(self) -> int:
        """Requests in flight on it, as best this gateway knows."""
        return max(self.outstanding, self.announced_in_flight)

    def has_room(self) -> bool:
        """A slot free for one more request (unknown capacity: assumed)."""
        return self.capacity <= 0 or self.load < self.capacity

    def has_room_for_best_effort(self, max_outstanding: int = 0) -> bool:
        """Room for one more mirror: below ``BEST_EFFORT_MAX_LOAD`` of its capacity, fewer
        than ``max_outstanding`` (0 = no bound) mirrors from this gateway already on it, and
        not paused by its last refusal. A replica runs only a few best-effort requests at
        once and refuses the rest: sending them anyway costs both sides CPU that the user
        requests beside them need."""
        if max_outstanding and self.best_effort_outstanding >= max_outstanding:
            return False
        if time.monotonic() < self.best_effort_paused_until:
            return False
        return self.capacity <= 0 or self.load < BEST_EFFORT_MAX_LOAD * self.capacity

    def pause_best_effort(self, retry_after_ms: int) -> None:
        """The replica refused a mirror: send it none for its advised wait (bounded)."""
        wait_s = min(max(retry_after_ms, BEST_EFFORT_MIN_PAUSE_MS), BEST_EFFORT_MAX_PAUSE_MS)
        self.best_effort_paused_until = time.monotonic() + wait_s / 1000

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
        self,
        static: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTls | None = None,
    ) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._tls = tls
        self._clock = clock
        # While this gateway cannot hear announcements (its NATS connection is down), a
        # replica's silence says nothing about it: the last known pool stays usable, and
        # silence counts again only from when announcements can be heard again.
        self._listening = True
        self._heard_since = 0.0
        for address in static:
            self.add(address).static = True

    def add(self, address: str, version_id: str = "") -> Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(address, tls=self._tls)
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
        endpoint.capacity = event.max_concurrent
        endpoint.announced_in_flight = event.in_flight
        # Heard when it was sent, not when it arrived: a starting gateway reads each
        # replica's last announcement from the stream, and a replica killed minutes ago
        # must not look alive because its last word was just replayed.
        endpoint.last_heard = self._clock() - _age_s(event)
        if endpoint.ejected_at is not None and endpoint.last_heard > endpoint.ejected_at:
            # It spoke after the failure that ejected it: back in rotation.
            log.info("inference replica %s heard from again; no longer ejected", endpoint.name)
            endpoint.ejected_at = None
        return endpoint

    def eject(self, address: str, reason: str = "") -> None:
        """Pass the replica over while others fit (a call to it just failed UNAVAILABLE).
        Another failure while ejected restarts the ejection, without counting a new one."""
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            return
        now = self._clock()
        fresh = not endpoint.ejected(now)
        endpoint.ejected_at = now
        if fresh:
            log.info(
                "inference replica %s ejected for up to %.0f s: %s",
                endpoint.name,
                endpoint.ejection_s(),
                reason or "unavailable",
            )
            _ejections.add(1, {"replica": endpoint.name})

    @property
    def addresses(self) -> list[str]:
        return list(self._endpoints)

    def get(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def pick(
        self,
        version_id: str,
        exclude: Iterable[str] = (),
        *,
        base_fingerprint: str = "",
        need_room: bool = False,
    ) -> Endpoint | None:
        """Best usable replica not in ``exclude`` that serves the version's base model
        (and with room, for ``need_room``): not ejected unless all that fit are; then
        loaded, then cached, then any; fewest outstanding requests; ties go to the first
        known (keeps tests deterministic)."""
        skip = set(exclude)
        now = self._clock()
        heard_since = now if not self._listening else self._heard_since
        usable = [
            e
            for a, e in self._endpoints.items()
            if a not in skip
            and e.usable(now, heard_since)
            and e.serves_base(base_fingerprint)
            and (e.has_room() or not need_room)
        ]
        if not usable:
            return None
        healthy = [e for e in usable if not e.ejected(now)]
        return min(healthy or usable, key=lambda e: (e.preference(version_id), e.outstanding))

    def set_listening(self, listening: bool) -> None:
        """Whether announcements can reach this gateway now (its NATS connection is up)."""
        if listening == self._listening:
            return
        self._listening = listening
        if listening:
            self._heard_since = self._clock()
        else:
            log.warning("announcements cannot be heard (NATS down): keeping the known replicas")

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            await endpoint.close()
