"""Thin gRPC layer over ``InferenceCore``; errors map to status codes in the interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_inference.core import InferenceCore


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore, *, base_model: str) -> None:
        self._core = core
        self._base_model = base_model

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> inference_pb2.GenerateResponse:
        version_id, done = await self._core.generate(
            request.version_id, request.prompt, request.sampling
        )
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
        async for version_id, chunk in self._core.stream(
            request.version_id, request.prompt, request.sampling
        ):
            yield inference_pb2.GenerateChunk(
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

    async def LoadAdapter(
        self, request: inference_pb2.LoadAdapterRequest, context: Any
    ) -> inference_pb2.AdapterStatus:
        return (await self._core.load(request.version_id)).record.to_proto()

    async def UnloadAdapter(
        self, request: inference_pb2.UnloadAdapterRequest, context: Any
    ) -> inference_pb2.AdapterStatus:
        return (await self._core.unload(request.version_id)).to_proto()

    async def ListAdapters(
        self, request: inference_pb2.ListAdaptersRequest, context: Any
    ) -> inference_pb2.ListAdaptersResponse:
        loader = self._core.loader
        return inference_pb2.ListAdaptersResponse(
            base_model=self._base_model,
            base_model_fingerprint=loader.base_fingerprint if loader else "",
            adapters=[r.to_proto() for r in self._core.adapters()],
        )
