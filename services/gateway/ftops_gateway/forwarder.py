"""Sends one request to an inference replica, retrying once on another replica when the
first is UNAVAILABLE before it produced anything (a replica restarting or gone)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from ftops.inference.v1 import inference_pb2
from ftops_gateway.endpoints import Endpoint, EndpointPool
from ftops_runtime import telemetry
from ftops_runtime.errors import Unavailable

log = logging.getLogger(__name__)

ATTEMPTS = 2


@dataclass
class Attempt:
    """Filled in by the forwarder: which replica answered, and whether it was a retry."""

    replica: str = ""
    retried: bool = False


def _metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The trace context, and the gateway's own key (inference checks its callers)."""
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    if api_key:
        carrier["authorization"] = f"Bearer {api_key}"
    return tuple(carrier.items())


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


class Forwarder:
    def __init__(self, pool: EndpointPool, *, timeout_s: float = 120.0, api_key: str = "") -> None:
        self.pool = pool
        self._timeout_s = timeout_s
        self._api_key = api_key

    def _pick(self, version_id: str, tried: list[str]) -> Endpoint:
        endpoint = self.pool.pick(version_id, exclude=tried)
        if endpoint is None and tried:
            # Only one replica known: a second try on it beats failing outright.
            endpoint = self.pool.pick(version_id)
        if endpoint is None:
            raise Unavailable("no inference endpoint is known to the gateway")
        return endpoint

    async def generate(
        self, request: inference_pb2.GenerateRequest, attempt: Attempt | None = None
    ) -> inference_pb2.GenerateResponse:
        tried: list[str] = []
        attempt = attempt or Attempt()
        while True:
            endpoint = self._pick(request.version_id, tried)
            attempt.replica, attempt.retried = endpoint.name, bool(tried)
            tried.append(endpoint.address)
            endpoint.outstanding += 1
            try:
                response: inference_pb2.GenerateResponse = await endpoint.stub().Generate(
                    request, timeout=self._timeout_s, metadata=_metadata(self._api_key)
                )
                return response
            except grpc.aio.AioRpcError as exc:
                if not _retryable(exc) or len(tried) >= ATTEMPTS:
                    raise
                log.info("inference %s unavailable (%s); retrying once", endpoint.address, exc)
            finally:
                endpoint.outstanding -= 1

    async def generate_stream(
        self, request: inference_pb2.GenerateRequest, attempt: Attempt | None = None
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        tried: list[str] = []
        attempt = attempt or Attempt()
        while True:
            endpoint = self._pick(request.version_id, tried)
            attempt.replica, attempt.retried = endpoint.name, bool(tried)
            tried.append(endpoint.address)
            endpoint.outstanding += 1
            produced = False
            try:
                call = endpoint.stub().GenerateStream(
                    request, timeout=self._timeout_s, metadata=_metadata(self._api_key)
                )
                async for chunk in call:
                    produced = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if produced or not _retryable(exc) or len(tried) >= ATTEMPTS:
                    raise
                log.info("inference %s unavailable (%s); retrying once", endpoint.address, exc)
            finally:
                endpoint.outstanding -= 1
