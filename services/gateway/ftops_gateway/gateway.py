"""The request path: resolve ``model`` to a version and arm, forward to inference, fall
back from a failing candidate to the stable version, and record one result per try."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway.chooser import ARM_BASE, ARM_CANDIDATE, ARM_DIRECT, ARM_STABLE, Rng, Target
from ftops_gateway.chooser import choose as choose_arm
from ftops_gateway.forwarder import Forwarder
from ftops_gateway.metrics_reporter import MetricsReporter
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.versions import VersionResolver
from ftops_runtime.errors import FtopsError, InvalidArgument, NotFound

BASE_MODEL = "base"
# Failures caused by the request itself: another version would fail it the same way, so
# they neither fall back to the stable version nor count against the candidate.
CLIENT_FAULTS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "CANCELLED"})


def status_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, FtopsError):
        return str(exc.code.name)
    return "INTERNAL"


class Gateway:
    def __init__(
        self,
        routes: RouteCache,
        versions: VersionResolver,
        forwarder: Forwarder,
        reporter: MetricsReporter,
        *,
        rng: Rng | None = None,
    ) -> None:
        self.routes = routes
        self.versions = versions
        self.forwarder = forwarder
        self.reporter = reporter
        self._rng: Rng = rng or random.Random()

    async def resolve(self, model: str) -> tuple[Target, Target | None]:
        """The target for one request and, for a candidate, the stable fallback."""
        if not model:
            raise InvalidArgument("model is required: an alias, a version id, or 'base'")
        if model == BASE_MODEL:
            return Target("", ARM_BASE), None
        # "adapter:number" is never an alias (aliases may not contain ':').
        route = None if ":" in model else await self.routes.lookup(model)
        if route is not None and route.stable_version_id:
            target = choose_arm(route, self._rng)
            fallback = None
            if target.arm == ARM_CANDIDATE:
                fallback = Target(
                    route.stable_version_id, ARM_STABLE, route.alias, route.release_id
                )
            return target, fallback
        try:
            version_id = await self.versions.resolve(model, what="model")
        except NotFound:
            raise NotFound(
                f"model {model!r} is neither a routed alias nor a registered version"
            ) from None
        return Target(version_id, ARM_DIRECT), None

    def _record(
        self,
        request: gateway_pb2.GenerateRequest,
        request_id: str,
        target: Target,
        started: float,
        *,
        status: str,
        first_token_at: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        now = time.monotonic()
        result = events_pb2.RequestResult(
            request_id=request_id,
            alias=target.alias,
            version_id=target.version_id,
            arm=target.arm,
            latency_ms=(now - started) * 1000,
            ttft_ms=(first_token_at - started) * 1000 if first_token_at is not None else 0.0,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            status=status,
            tenant=request.tenant,
            release_id=target.release_id if target.arm in (ARM_STABLE, ARM_CANDIDATE) else "",
        )
        result.finished_at.GetCurrentTime()
        self.reporter.record(result)

    @staticmethod
    def _inference_request(
        request: gateway_pb2.GenerateRequest, request_id: str, target: Target
    ) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(
            request_id=request_id,
            version_id=target.version_id,
            prompt=request.prompt,
            sampling=request.sampling,
        )

    async def generate(self, request: gateway_pb2.GenerateRequest) -> gateway_pb2.GenerateResponse:
        request_id = request.request_id or uuid.uuid4().hex
        target, fallback = await self.resolve(request.model)
        while True:
            started = time.monotonic()
            try:
                response = await self.forwarder.generate(
                    self._inference_request(request, request_id, target)
                )
            except Exception as exc:
                status = status_name(exc)
                self._record(request, request_id, target, started, status=status)
                if fallback is None or status in CLIENT_FAULTS:
                    raise
                # The candidate failed: count it against the candidate, answer from stable.
                target, fallback = fallback, None
                continue
            self._record(
                request,
                request_id,
                target,
                started,
                status="OK",
                prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens,
            )
            return gateway_pb2.GenerateResponse(
                request_id=request_id,
                model=request.model,
                version_id=target.version_id,
                arm=target.arm,
                text=response.text,
                prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens,
                finish_reason=response.finish_reason,
            )

    async def generate_stream(
        self, request: gateway_pb2.GenerateRequest
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        target, fallback = await self.resolve(request.model)
        while True:
            started = time.monotonic()
            first_token_at: float | None = None
            prompt_tokens = completion_tokens = 0
            try:
                async for chunk in self.forwarder.generate_stream(
                    self._inference_request(request, request_id, target)
                ):
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    prompt_tokens = max(prompt_tokens, chunk.prompt_tokens)
                    completion_tokens = max(completion_tokens, chunk.completion_tokens)
                    yield gateway_pb2.GenerateChunk(
                        request_id=request_id,
                        version_id=target.version_id,
                        arm=target.arm,
                        text=chunk.text,
                        completion_tokens=chunk.completion_tokens,
                        finish_reason=chunk.finish_reason,
                    )
            except Exception as exc:
                status = status_name(exc)
                self._record(
                    request,
                    request_id,
                    target,
                    started,
                    status=status,
                    first_token_at=first_token_at,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
                # Once text went out the client has it; switching versions mid-answer
                # would splice two models' outputs.
                if fallback is None or first_token_at is not None or status in CLIENT_FAULTS:
                    raise
                target, fallback = fallback, None
                continue
            self._record(
                request,
                request_id,
                target,
                started,
                status="OK",
                first_token_at=first_token_at,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
            return
