"""The server interceptor every service runs: tracing, error mapping and an auth hook.

It wraps the method's behaviour, so it sees the call from start to end for unary and
streaming responses alike. Order (outermost first): tracing, errors, auth. The span and
error helpers also serve requests that arrive over a multiplexed stream.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode

from ftops_runtime import telemetry
from ftops_runtime.denials import DenialRecorder, key_from_metadata, key_id_of, source_of
from ftops_runtime.errors import FtopsError, Unauthenticated

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ftops.grpc")
meter = metrics.get_meter("ftops.grpc")
rpc_duration = meter.create_histogram(
    "rpc.server.duration", unit="ms", description="gRPC server call duration by method and status"
)

# Methods every client (load balancers, grpcurl) must reach without credentials.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    """Who is calling. Richer identity (teams, roles) plugs in through the auth hook."""

    key_id: str
    anonymous: bool = False


ANONYMOUS = Principal(key_id="anonymous", anonymous=True)
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "current_principal", default=ANONYMOUS
)

Behavior = Callable[..., Any]
Authenticator = Callable[[Mapping[str, str], str], Awaitable[Principal]]


@dataclass(frozen=True)
class CallOrigin:
    """Where the current call came from and where its refusals are recorded: set by the
    interceptor for the call, inherited by the tasks it starts (a multiplexed stream's
    requests)."""

    recorder: DenialRecorder
    source: str
    key_id: str


call_origin: contextvars.ContextVar[CallOrigin | None] = contextvars.ContextVar(
    "call_origin", default=None
)


def note_denial(exc: BaseException, method: str, *, key_id: str | None = None) -> None:
    """Record ``exc`` for the audit log if it refuses the current call and nobody audited
    it yet. ``key_id``: the key the refusal concerns when it is not the call's own (the
    registry's Authenticate checks a key sent in the request)."""
    origin = call_origin.get()
    if origin is None:
        return
    origin.recorder.record_exception(
        exc,
        method=method.rpartition("/")[2] or method,
        key_id=origin.key_id if key_id is None else key_id,
        source=origin.source,
    )


def server_span(method: str, carrier: Mapping[str, str]) -> Any:
    """A SERVER span for one call of ``method``, child of the caller's span (traceparent in
    ``carrier``). Also used for the requests carried over a multiplexed stream."""
    service, _, name = method.lstrip("/").partition("/")
    return tracer.start_as_current_span(
        method.lstrip("/"),
        context=telemetry.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,
        set_status_on_exception=False,
    )


def record_call(
    span: trace.Span, method: str, code: grpc.StatusCode, details: str, started: float
) -> None:
    """The call's status on its span, and its duration in ``rpc.server.duration``."""
    if code != grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, details or code.name))
    rpc_duration.record(
        (time.perf_counter() - started) * 1000,
        {"rpc.method": method.lstrip("/"), "rpc.grpc.status_code": code.name},
    )


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with: a domain error's own, a
    downstream call's, or INTERNAL (logged with its traceback, never shown to the caller).
    A refusal (UNAUTHENTICATED, PERMISSION_DENIED) is recorded for the audit log."""
    if isinstance(exc, FtopsError):
        note_denial(exc, method)
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    log.exception("unhandled error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}"


def api_key_authenticator(keys: frozenset[str]) -> Authenticator:
    """The default hook: a static set of API keys as ``authorization: Bearer <key>``
    (or ``x-api-key``). Empty set = authentication off (development)."""

    async def authenticate(md: Mapping[str, str], method: str) -> Principal:
        if not keys:
            return ANONYMOUS
        key = md.get("x-api-key", "")
        auth = md.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key not in keys:
            raise Unauthenticated("missing or invalid API key (send 'authorization: Bearer <key>')")
        return Principal(key_id=hashlib.sha256(key.encode()).hexdigest()[:12])

    return authenticate


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each method's behaviour once, outermost first: a SERVER span child of the
    caller's (traceparent in metadata) with the call's duration; domain errors mapped to
    their status code; the caller resolved through the auth hook as ``current_principal``.

    One interceptor rather than a chain of three: grpc.aio rebuilds the handler once per
    interceptor per call, which cost more than the gateway's own work per request."""

    def __init__(self, authenticate: Authenticator, denials: DenialRecorder | None = None) -> None:
        self._authenticate = authenticate
        self._denials = denials

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        public = method.startswith(PUBLIC_METHOD_PREFIXES)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, metadata, public),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, metadata, public),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(handler.unary_stream, method, metadata, public),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_streaming(handler.stream_stream, method, metadata, public),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_streaming(
        self, behavior: Behavior, method: str, md: Mapping[str, str], public: bool
    ) -> Behavior:
        # A streaming handler is an async generator, or a coroutine that sends with
        # context.write() (grpc's own health Watch): the latter is wrapped like a unary one.
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_stream(behavior, method, md, public)
        return self._wrap_unary(behavior, method, md, public)

    async def _principal(self, md: Mapping[str, str], method: str, public: bool) -> Principal:
        return ANONYMOUS if public else await self._authenticate(md, method)

    def _origin(self, md: Mapping[str, str], context: Any) -> CallOrigin | None:
        if self._denials is None:
            return None
        peer = context.peer() if hasattr(context, "peer") else ""
        return CallOrigin(self._denials, source_of(peer or ""), key_id_of(key_from_metadata(md)))

    def _wrap_unary(
        self, behavior: Behavior, method: str, md: Mapping[str, str], public: bool
    ) -> Behavior:
        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            with server_span(method, md) as span:
                origin = call_origin.set(self._origin(md, context))
                try:
                    token = current_principal.set(await self._principal(md, method, public))
                    try:
                        return await behavior(request, context)
                    finally:
                        current_principal.reset(token)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await context.abort(*status_of(exc, method))
                finally:
                    _record(span, context, method, started)
                    call_origin.reset(origin)

        return call

    def _wrap_stream(
        self, behavior: Behavior, method: str, md: Mapping[str, str], public: bool
    ) -> Behavior:
        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            with server_span(method, md) as span:
                call_origin.set(self._origin(md, context))
                try:
                    current_principal.set(await self._principal(md, method, public))
                    async for item in behavior(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await context.abort(*status_of(exc, method))
                finally:
                    _record(span, context, method, started)

        return call


def _record(span: trace.Span, context: Any, method: str, started: float) -> None:
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK
    record_call(span, method, code, str(context.details() or ""), started)
