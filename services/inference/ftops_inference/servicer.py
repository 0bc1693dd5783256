"""Thin gRPC layer over ``InferenceCore``; errors map to status codes in the interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_inference.access import InferenceAccess
from ftops_inference.backend import Chunk
from ftops_inference.core import InferenceCore
from ftops_inference.loader import AdapterRecord
from ftops_inference.metrics import VersionCounts
from ftops_inference.multiplex import MultiplexSession
from ftops_runtime.auth import Role
from ftops_runtime.errors import FtopsError, retry_after_metadata


def _best_effort(request: inference_pb2.GenerateRequest) -> bool:
    return request.priority == inference_pb2.REQUEST_PRIORITY_BEST_EFFORT


def _messages(request: inference_pb2.GenerateRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


def _timeout_s(request: inference_pb2.GenerateRequest, context: Any) -> float | None:
    """The caller's remaining deadline: the call's own, or the one a multiplexed request
    carries (it has no gRPC deadline of its own); the shorter when both are set."""
    limits = [request.timeout_ms / 1000] if request.timeout_ms else []
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        limits.append(remaining)
    return min(limits) if limits else None


def _advise_retry(context: Any, exc: FtopsError) -> None:
    """A refusal's retry advice as the call's trailing metadata (the error interceptor
    aborts the call after this and keeps it)."""
    if context is not None and exc.retry_after_ms:
        context.set_trailing_metadata(retry_after_metadata(exc))


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        core: InferenceCore,
        *,
        base_model: str,
        replica_id: str = "",
        access: InferenceAccess | None = None,
    ) -> None:
        self._core = core
        self._access = access
        self._base_model = base_model
        self._replica_id = replica_id
        self._sessions: set[MultiplexSession] = set()

    def _status(self, record: AdapterRecord) -> inference_pb2.AdapterStatus:
        status = record.to_proto()
        stats = self._core.backend.adapter_stats(record.version_id)
        counts = self._core.metrics.by_version.get(record.version_id, VersionCounts())
        status.tier = stats.tier
        status.loads, status.reloads, status.evictions = stats.loads, stats.reloads, stats.evictions
        status.requests, status.errors = counts.requests, counts.errors
        status.completion_tokens = counts.completion_tokens
        return status

    async def _may_generate(self, version_ref: str) -> None:
        if self._access is not None:
            await self._access.require_version(version_ref, Role.viewer, "Generate")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> inference_pb2.GenerateResponse:
        await self._may_generate(request.version_id)
        try:
            version_id, done = await self._core.generate(
                request.version_id,
                request.prompt,
                request.sampling,
                best_effort=_best_effort(request),
                timeout_s=_timeout_s(request, context),
                messages=_messages(request),
            )
        except FtopsError as exc:
            _advise_retry(context, exc)
            raise
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            version_id=version_id,
            text=done.text,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=done.finish_reason.proto,
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        await self._may_generate(request.version_id)
        chunks = self._core.stream(
            request.version_id,
            request.prompt,
            request.sampling,
            best_effort=_best_effort(request),
            timeout_s=_timeout_s(request, context),
            messages=_messages(request),
        )
        try:
            async for version_id, chunk in chunks:
                yield self._chunk(request, version_id, chunk)
        except FtopsError as exc:
            _advise_retry(context, exc)
            raise
        finally:
            await chunks.aclose()

    @staticmethod
    def _chunk(
        request: inference_pb2.GenerateRequest, version_id: str, chunk: Chunk
    ) -> inference_pb2.GenerateChunk:
        return inference_pb2.GenerateChunk(
            request_id=request.request_id,
            version_id=version_id,
            text=chunk.text,
            completion_tokens=chunk.completion_tokens,
            finish_reason=(
                chunk.finish_reason.proto
                if chunk.finish_reason
                else common_pb2.FINISH_REASON_UNSPECIFIED
            ),
            prompt_tokens=chunk.prompt_tokens,
        )

    async def Multiplex(
        self, request_iterator: AsyncIterator[inference_pb2.MultiplexRequest], context: Any
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        # Headers at once: the gateway waits for them before sending requests on the stream.
        await context.send_initial_metadata(())
        session = MultiplexSession(
            lambda request: self.Generate(request, None),
            lambda request: self.GenerateStream(request, None),
        )
        self._sessions.add(session)
        try:
            async for answer in session.serve(request_iterator):
                yield answer
        finally:
            self._sessions.discard(session)

    def end_streams(self) -> None:
        """Ends every open Multiplex stream once its requests are answered (on stop)."""
        for session in list(self._sessions):
            session.finish()

    async def LoadAdapter(
        self, request: inference_pb2.LoadAdapterRequest, context: Any
    ) -> inference_pb2.AdapterStatus:
        if self._access is not None:
            await self._access.require_version(request.version_id, Role.admin, "LoadAdapter")
        return self._status((await self._core.load(request.version_id)).record)

    async def UnloadAdapter(
        self, request: inference_pb2.UnloadAdapterRequest, context: Any
    ) -> inference_pb2.AdapterStatus:
        if self._access is not None:
            await self._access.require_version(request.version_id, Role.admin, "UnloadAdapter")
        return self._status(await self._core.unload(request.version_id))

    async def ListAdapters(
        self, request: inference_pb2.ListAdaptersRequest, context: Any
    ) -> inference_pb2.ListAdaptersResponse:
        # Every team's versions are listed: the replica's operators (platform admins) and
        # service keys only.
        if self._access is not None:
            self._access.require_platform_admin("ListAdapters")
        core = self._core
        loader = core.loader
        return inference_pb2.ListAdaptersResponse(
            base_model=self._base_model,
            base_model_fingerprint=loader.base_fingerprint if loader else "",
            adapters=[self._status(r) for r in core.adapters()],
            replica_id=self._replica_id,
            serving=core.serving,
            in_flight=core.in_flight,
            max_concurrent=core.max_concurrent,
            backend=core.backend.kind,
            base_requests=core.metrics.by_version.get("", VersionCounts()).requests,
        )
