"""Server interceptor chain shared by every service: tracing, error mapping and an auth hook.

Each interceptor wraps the method's behaviour, so it sees the call from start to end for
unary and streaming responses alike. Order (outermost first): tracing, errors, auth.
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


class _WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rebuilds the handler with its behaviour wrapped; subclasses say how to wrap."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap_unary(handler.unary_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self.wrap_unary(handler.stream_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_streaming(handler.stream_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_streaming(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        # A streaming handler is an async generator, or a coroutine that sends with
        # context.write() (grpc's own health Watch): the latter is wrapped like a unary one.
        if inspect.isasyncgenfunction(behavior):
            return self.wrap_stream(behavior, method, md)
        return self.wrap_unary(behavior, method, md)

    def wrap_unary(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        raise NotImplementedError

    def wrap_stream(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        raise NotImplementedError


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


class TracingInterceptor(_WrappingInterceptor):
    """A SERVER span per call, child of the caller's span (traceparent in metadata)."""

    @staticmethod
    def _span(method: str, md: Mapping[str, str]) -> Any:
        return server_span(method, md)

    @staticmethod
    def _record(span: trace.Span, context: Any, method: str, started: float) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK
        record_call(span, method, code, str(context.details() or ""), started)

    def wrap_unary(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        async def traced(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            with self._span(method, md) as span:
                try:
                    return await behavior(request, context)
                finally:
                    self._record(span, context, method, started)

        return traced

    def wrap_stream(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            with self._span(method, md) as span:
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    self._record(span, context, method, started)

        return traced


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with: a domain error's own, a
    downstream call's, or INTERNAL (logged with its traceback, never shown to the caller)."""
    if isinstance(exc, FtopsError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    log.exception("unhandled error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}"


class ErrorMappingInterceptor(_WrappingInterceptor):
    """Domain errors become their status code with the message as details; errors from a
    downstream gRPC call keep their code; anything else is INTERNAL, logged with its
    traceback but never leaked to the client."""

    @staticmethod
    async def _abort(exc: BaseException, method: str, context: Any) -> None:
        code, details = status_of(exc, method)
        await context.abort(code, details)

    def wrap_unary(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        async def mapped(request: Any, context: Any) -> Any:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._abort(exc, method, context)

        return mapped

    def wrap_stream(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        async def mapped(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._abort(exc, method, context)

        return mapped


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


class AuthInterceptor(_WrappingInterceptor):
    """Resolves the caller through the hook and exposes it as ``current_principal``."""

    def __init__(self, authenticate: Authenticator) -> None:
        self._authenticate = authenticate

    def _public(self, method: str) -> bool:
        return method.startswith(PUBLIC_METHOD_PREFIXES)

    def wrap_unary(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        if self._public(method):
            return behavior

        async def authed(request: Any, context: Any) -> Any:
            token = current_principal.set(await self._authenticate(md, method))
            try:
                return await behavior(request, context)
            finally:
                current_principal.reset(token)

        return authed

    def wrap_stream(self, behavior: Behavior, method: str, md: Mapping[str, str]) -> Behavior:
        if self._public(method):
            return behavior

        async def authed(request: Any, context: Any) -> AsyncIterator[Any]:
            current_principal.set(await self._authenticate(md, method))
            async for item in behavior(request, context):
                yield item

        return authed
