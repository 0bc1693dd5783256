"""gRPC client channels that carry the trace context and the caller's API key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ftops_runtime import telemetry
from ftops_runtime.server import grpc_options
from ftops_runtime.tls import ClientTls


def _with_metadata(details: Any, extra: list[tuple[str, str]]) -> Any:
    metadata = list(details.metadata or [])
    metadata.extend(extra)
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _Metadata:
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def extra(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
        extra = list(carrier.items())
        if self._api_key:
            extra.append(("authorization", f"Bearer {self._api_key}"))
        return extra


# One class per call kind: grpc.aio files each interceptor under the first kind it is an
# instance of, so a single class implementing all four would only see unary-unary calls
# (streaming uploads and watches would go out without the key or the trace context).
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: _Metadata) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with_metadata(details, self._metadata.extra()), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: _Metadata) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with_metadata(details, self._metadata.extra()), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: _Metadata) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_metadata(details, self._metadata.extra()), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: _Metadata) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_metadata(details, self._metadata.extra()), request_iterator)


def channel(
    address: str,
    *,
    api_key: str = "",
    max_message_mb: int = 64,
    tls: ClientTls | None = None,
    propagate: bool = True,
) -> grpc.aio.Channel:
    """A channel to ``address`` (host:port): TLS when ``tls`` is given (the CA to verify
    the server with, the client certificate for mutual TLS), plaintext otherwise. With
    ``propagate`` every call carries the trace context and ``api_key``; hot paths that
    add their own metadata pass False (interceptors cost more than the call's work)."""
    options = grpc_options(max_message_mb)
    interceptors: list[Any] = []
    if propagate:
        metadata = _Metadata(api_key)
        interceptors = [
            _UnaryUnary(metadata),
            _UnaryStream(metadata),
            _StreamUnary(metadata),
            _StreamStream(metadata),
        ]
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=options, interceptors=interceptors
    )
