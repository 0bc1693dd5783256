"""Sends one request to an inference replica, retrying once on another replica when the
first is UNAVAILABLE before it produced anything (a replica restarting or gone). Every
UNAVAILABLE failure — the last attempt's and a stream's that already produced chunks
included — ejects that replica from the pool (see endpoints.py), so the requests after it
go to another replica first instead of failing there too.

A replica that refuses a request for capacity (RESOURCE_EXHAUSTED: its queue is full, or
the request's deadline is shorter than its queue) is not ejected: the request goes to
another replica with room when there is one, never back to the same one, and otherwise
fails with the refusal (and its retry advice). Best-effort requests (mirrors) are not sent
at all to a replica near its announced capacity, to one that already runs
``mirror_max_per_replica`` of this gateway's mirrors, or to one that refused a mirror within
its retry advice (``MirrorSkipped``): under load, mirrors are sampled down instead of sent
to be refused.

Multiplexed requests carry the time they have left (``timeout_ms``): the replica refuses at
once a request that could not get a slot in time.

Requests go over the replica's multiplexed stream (``transport="multiplex"``, the default;
see multiplexer.py), or as one gRPC call each (``"unary"``, and for a replica too old to
have the stream)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from ftops.inference.v1 import inference_pb2
from ftops_gateway.endpoints import Endpoint, EndpointPool
from ftops_gateway.multiplexer import MultiplexChannel, MultiplexUnsupported
from ftops_runtime import telemetry
from ftops_runtime.errors import (
    FtopsError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    retry_after_ms_of,
)

log = logging.getLogger(__name__)

ATTEMPTS = 2
# The deadline (time.monotonic()) of the client request being served, set by the front end
# that took it; None: no deadline but the gateway's own.
caller_deadline: ContextVar[float | None] = ContextVar("caller_deadline", default=None)
TRANSPORTS = ("multiplex", "unary")
# A version id -> the fingerprint of the base model it was trained on.
BaseLookup = Callable[[str], Awaitable[str]]


@dataclass
class Attempt:
    """Filled in by the forwarder: which replica answered, and whether it was a retry."""

    replica: str = ""
    retried: bool = False


def _key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The gateway's own key (inference checks its callers)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _trace_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    return carrier


class MirrorSkipped(ResourceExhausted):
    """A best-effort request not sent: the replica it would go to is near its capacity."""


def _code(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        code: grpc.StatusCode = exc.code()
        return code
    return exc.code if isinstance(exc, FtopsError) else None


def _reason(exc: grpc.aio.AioRpcError | FtopsError) -> str:
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    return f"UNAVAILABLE: {details or 'no details'}"


def _best_effort(request: inference_pb2.GenerateRequest) -> bool:
    return request.priority == inference_pb2.REQUEST_PRIORITY_BEST_EFFORT


class Forwarder:
    def __init__(
        self,
        pool: EndpointPool,
        *,
        timeout_s: float = 120.0,
        api_key: str = "",
        transport: str = "multiplex",
        base_of: BaseLookup | None = None,
        mirror_max_per_replica: int = 1,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.pool = pool
        self._timeout_s = timeout_s
        self._key = _key_metadata(api_key)
        self._multiplex = transport == "multiplex"
        self._base_of = base_of
        self._mirror_cap = mirror_max_per_replica

    def _stream_to(self, endpoint: Endpoint) -> MultiplexChannel | None:
        """The replica's multiplexed stream, unless requests go as single calls to it."""
        if not self._multiplex:
            return None
        channel = endpoint.multiplex(self._key)
        return None if channel.unsupported else channel

    async def _generate_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> inference_pb2.GenerateResponse:
        trace_context = _trace_context()
        timeout_s = request.timeout_ms / 1000
        if (channel := self._stream_to(endpoint)) is not None:
            try:
                return await channel.generate(
                    request, timeout_s=timeout_s, trace_context=trace_context
                )
            except MultiplexUnsupported:
                pass
        response: inference_pb2.GenerateResponse = await endpoint.stub().Generate(
            request, timeout=timeout_s, metadata=(*trace_context.items(), *self._key)
        )
        return response

    async def _stream_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        trace_context = _trace_context()
        timeout_s = request.timeout_ms / 1000
        if (channel := self._stream_to(endpoint)) is not None:
            chunks = channel.generate_stream(
                request, timeout_s=timeout_s, trace_context=trace_context
            )
            try:
                async for chunk in chunks:
                    yield chunk
                return
            except MultiplexUnsupported:
                pass  # said before anything was produced: the stream was never there
            finally:
                await chunks.aclose()
        call = endpoint.stub().GenerateStream(
            request, timeout=timeout_s, metadata=(*trace_context.items(), *self._key)
        )
        async for chunk in call:
            yield chunk

    async def _base(self, version_id: str) -> str:
        """The fingerprint of the version's base model ("" for the base itself, or when it
        cannot be learnt now: then any replica may be tried, and one serving another base
        refuses the version)."""
        if not version_id or self._base_of is None:
            return ""
        try:
            return await self._base_of(version_id)
        except (Unavailable, NotFound) as exc:
            log.warning("base model of %s unknown (%s); not filtering replicas", version_id, exc)
            return ""

    def _pick(
        self, request: inference_pb2.GenerateRequest, tried: list[str], base: str
    ) -> Endpoint:
        version_id = request.version_id
        endpoint = self.pool.pick(version_id, exclude=tried, base_fingerprint=base)
        if endpoint is None and tried:
            # Only one replica known: a second try on it beats failing outright.
            endpoint = self.pool.pick(version_id, base_fingerprint=base)
        if endpoint is None:
            if base:
                raise Unavailable(
                    f"no usable inference replica serves the base model of {version_id} "
                    f"(fingerprint {base[:12]})"
                )
            raise Unavailable("no inference endpoint is known to the gateway")
        if _best_effort(request) and not endpoint.has_room_for_best_effort(self._mirror_cap):
            raise MirrorSkipped(
                f"best-effort request not sent: inference {endpoint.name} is busy "
                f"({endpoint.load} of {endpoint.capacity} slots, "
                f"{endpoint.best_effort_outstanding} mirrors in flight)"
            )
        return endpoint

    def _retry_after(
        self,
        exc: grpc.aio.AioRpcError | FtopsError,
        endpoint: Endpoint,
        request: inference_pb2.GenerateRequest,
        tried: list[str],
        base: str,
        *,
        produced: bool = False,
    ) -> Endpoint:
        """The replica to try next after ``exc``, or raises it: UNAVAILABLE ejects the
        replica and is retried once anywhere else (on it again when it is the only one);
        a capacity refusal is retried only on another replica with room."""
        code = _code(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            self.pool.eject(endpoint.address, _reason(exc))
            if produced or len(tried) >= ATTEMPTS:
                raise exc
            log.info("inference %s unavailable (%s); retrying once", endpoint.address, exc)
            return self._pick(request, tried, base)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not produced and len(tried) < ATTEMPTS:
            other = self.pool.pick(
                request.version_id, exclude=tried, base_fingerprint=base, need_room=True
            )
            if other is not None:
                log.debug("inference %s refused for capacity; trying %s", endpoint.name, other.name)
                return other
        raise exc

    def _deadline(self) -> float:
        """When forwarding must be over: the gateway's own limit, or the caller's deadline
        when it is sooner (the replica then refuses at once what it cannot start in time,
        instead of the caller timing out while the request still waits in its queue)."""
        own = time.monotonic() + self._timeout_s
        caller = caller_deadline.get()
        return own if caller is None else min(own, caller)

    def _stamp_deadline(self, request: inference_pb2.GenerateRequest, deadline: float) -> None:
        """What the request has left, for the replica's queue (multiplexed requests have
        no gRPC deadline of their own)."""
        left_ms = (deadline - time.monotonic()) * 1000
        request.timeout_ms = max(1, int(left_ms))

    async def generate(
        self, request: inference_pb2.GenerateRequest, attempt: Attempt | None = None
    ) -> inference_pb2.GenerateResponse:
        tried: list[str] = []
        attempt = attempt or Attempt()
        deadline = self._deadline()
        base = await self._base(request.version_id)
        endpoint = self._pick(request, tried, base)
        best_effort = _best_effort(request)
        while True:
            attempt.replica, attempt.retried = endpoint.name, bool(tried)
            tried.append(endpoint.address)
            self._stamp_deadline(request, deadline)
            endpoint.outstanding += 1
            endpoint.best_effort_outstanding += best_effort
            failed_on = endpoint
            try:
                return await self._generate_on(endpoint, request)
            except (grpc.aio.AioRpcError, FtopsError) as exc:
                if best_effort and _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    failed_on.pause_best_effort(retry_after_ms_of(exc))
                endpoint = self._retry_after(exc, failed_on, request, tried, base)
            finally:
                failed_on.outstanding -= 1
                failed_on.best_effort_outstanding -= best_effort

    async def generate_stream(
        self, request: inference_pb2.GenerateRequest, attempt: Attempt | None = None
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        tried: list[str] = []
        attempt = attempt or Attempt()
        deadline = self._deadline()
        base = await self._base(request.version_id)
        endpoint = self._pick(request, tried, base)
        while True:
            attempt.replica, attempt.retried = endpoint.name, bool(tried)
            tried.append(endpoint.address)
            self._stamp_deadline(request, deadline)
            endpoint.outstanding += 1
            failed_on = endpoint
            produced = False
            try:
                chunks = self._stream_on(endpoint, request)
                try:
                    async for chunk in chunks:
                        produced = True
                        yield chunk
                finally:
                    await chunks.aclose()
                return
            except (grpc.aio.AioRpcError, FtopsError) as exc:
                endpoint = self._retry_after(
                    exc, failed_on, request, tried, base, produced=produced
                )
            finally:
                failed_on.outstanding -= 1
