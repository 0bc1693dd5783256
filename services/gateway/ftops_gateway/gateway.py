"""The request path: resolve ``model`` to a version and arm (flag rules, sticky or
weighted split), forward to inference, fall back from a failing candidate to the stable
version, mirror to the candidate when the release says so, and record one result per try.
Reporting and mirroring never block or fail the client's request."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway.chooser import (
    ARM_BASE,
    ARM_CANDIDATE,
    ARM_DIRECT,
    ARM_STABLE,
    Caller,
    Rng,
    Target,
    mirrors,
)
from ftops_gateway.chooser import choose as choose_arm
from ftops_gateway.forwarder import Attempt, Forwarder
from ftops_gateway.metrics_reporter import MetricsReporter
from ftops_gateway.openai_chat import inference_chat_message
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.shadow import Mirror, ShadowMirror
from ftops_gateway.statuses import CLIENT_FAULTS, failure_origin, status_name
from ftops_gateway.versions import VersionResolver
from ftops_runtime.errors import InvalidArgument, NotFound

__all__ = ["BASE_MODEL", "CLIENT_FAULTS", "Gateway", "status_name"]

BASE_MODEL = "base"


@dataclass(frozen=True)
class Plan:
    """Where a request goes, where it falls back to, and whether it is mirrored."""

    target: Target
    fallback: Target | None = None
    mirror_to: Target | None = None


class Gateway:
    def __init__(
        self,
        routes: RouteCache,
        versions: VersionResolver,
        forwarder: Forwarder,
        reporter: MetricsReporter,
        *,
        rng: Rng | None = None,
        shadow: ShadowMirror | None = None,
    ) -> None:
        self.routes = routes
        self.versions = versions
        self.forwarder = forwarder
        self.reporter = reporter
        self.shadow = shadow or ShadowMirror(forwarder, reporter)
        self._rng: Rng = rng or random.Random()

    async def plan(self, model: str, caller: Caller | None = None) -> Plan:
        if not model:
            raise InvalidArgument("model is required: an alias, a version id, or 'base'")
        if model == BASE_MODEL:
            return Plan(Target("", ARM_BASE))
        # "adapter:number" is never an alias (aliases may not contain ':').
        route = None if ":" in model else await self.routes.lookup(model)
        if route is not None and route.stable_version_id:
            target = choose_arm(route, self._rng, caller)
            fallback = mirror_to = None
            if target.arm == ARM_CANDIDATE:
                fallback = Target(
                    route.stable_version_id, ARM_STABLE, route.alias, route.release_id
                )
            elif mirrors(route, target, self._rng):
                mirror_to = Target(
                    route.candidate_version_id, ARM_CANDIDATE, route.alias, route.release_id
                )
            return Plan(target, fallback, mirror_to)
        try:
            version_id = await self.versions.resolve(model, what="model")
        except NotFound:
            raise NotFound(
                f"model {model!r} is neither a routed alias nor a registered version"
            ) from None
        return Plan(Target(version_id, ARM_DIRECT))

    async def resolve(
        self, model: str, caller: Caller | None = None
    ) -> tuple[Target, Target | None]:
        """The target for one request and, for a candidate, the stable fallback."""
        plan = await self.plan(model, caller)
        return plan.target, plan.fallback

    def _record(
        self,
        request: gateway_pb2.GenerateRequest,
        request_id: str,
        target: Target,
        started: float,
        *,
        status: str,
        attempt: Attempt,
        fallback: bool = False,
        first_token_at: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        now = time.monotonic()
        released = target.arm in (ARM_STABLE, ARM_CANDIDATE)
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
            release_id=target.release_id if released else "",
            replica_id=attempt.replica,
            retried=attempt.retried,
            fallback=fallback,
            flag=target.flag,
            failure_origin=failure_origin(status),
        )
        result.finished_at.FromNanoseconds(time.time_ns())
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
            messages=[inference_chat_message(m) for m in request.messages],
        )

    def _start_mirror(
        self, plan: Plan, request: gateway_pb2.GenerateRequest, request_id: str
    ) -> Mirror | None:
        if plan.mirror_to is None:
            return None
        return self.shadow.start(request, request_id, plan.mirror_to)

    async def generate(
        self, request: gateway_pb2.GenerateRequest, caller: Caller | None = None
    ) -> gateway_pb2.GenerateResponse:
        request_id = request.request_id or uuid.uuid4().hex
        plan = await self.plan(request.model, caller or caller_of(request))
        target, fallback = plan.target, plan.fallback
        mirror = self._start_mirror(plan, request, request_id)
        answer: str | None = None
        fell_back = False
        try:
            while True:
                started = time.monotonic()
                attempt = Attempt()
                try:
                    response = await self.forwarder.generate(
                        self._inference_request(request, request_id, target), attempt
                    )
                except Exception as exc:
                    status = status_name(exc)
                    self._record(
                        request, request_id, target, started, status=status, attempt=attempt
                    )
                    if fallback is None or status in CLIENT_FAULTS:
                        raise
                    # The candidate failed: count it against the candidate, answer from
                    # stable (the client never sees the candidate's failure).
                    target, fallback, fell_back = fallback, None, True
                    continue
                self._record(
                    request,
                    request_id,
                    target,
                    started,
                    status="OK",
                    attempt=attempt,
                    fallback=fell_back,
                    prompt_tokens=response.prompt_tokens,
                    completion_tokens=response.completion_tokens,
                )
                answer = response.text
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
        finally:
            if mirror is not None:
                mirror.finish(answer)

    async def generate_stream(
        self, request: gateway_pb2.GenerateRequest, caller: Caller | None = None
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        plan = await self.plan(request.model, caller or caller_of(request))
        target, fallback = plan.target, plan.fallback
        mirror = self._start_mirror(plan, request, request_id)
        pieces: list[str] = []
        complete = False
        fell_back = False
        try:
            while True:
                started = time.monotonic()
                attempt = Attempt()
                first_token_at: float | None = None
                prompt_tokens = completion_tokens = 0
                try:
                    async for chunk in self.forwarder.generate_stream(
                        self._inference_request(request, request_id, target), attempt
                    ):
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                        prompt_tokens = max(prompt_tokens, chunk.prompt_tokens)
                        completion_tokens = max(completion_tokens, chunk.completion_tokens)
                        if mirror is not None:
                            pieces.append(chunk.text)
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
                        attempt=attempt,
                        fallback=fell_back,
                        first_token_at=first_token_at,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                    )
                    # Once text went out the client has it; switching versions mid-answer
                    # would splice two models' outputs.
                    if fallback is None or first_token_at is not None or status in CLIENT_FAULTS:
                        raise
                    target, fallback, fell_back = fallback, None, True
                    continue
                self._record(
                    request,
                    request_id,
                    target,
                    started,
                    status="OK",
                    attempt=attempt,
                    fallback=fell_back,
                    first_token_at=first_token_at,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
                complete = True
                return
        finally:
            if mirror is not None:
                mirror.finish("".join(pieces) if complete else None)


def caller_of(request: gateway_pb2.GenerateRequest) -> Caller:
    return Caller(tenant=request.tenant, user=request.user, metadata=dict(request.metadata))
