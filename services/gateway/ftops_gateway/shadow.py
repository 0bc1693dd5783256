"""Mirrored requests: a stable-arm request also sent, in the background, to the candidate.

The client only ever gets the stable answer and never waits for the mirror. Once both
answers are in, the candidate's is reported as a ``RequestResult`` with arm "shadow",
``shadow_of`` = the stable request's id and the output divergence (1 - similarity of the
two word sequences). Mirrors beyond ``max_in_flight`` are dropped rather than queued, so
a slow candidate cannot pile up work behind the client traffic.

Mirrors are best-effort (``REQUEST_PRIORITY_BEST_EFFORT``): not sent to a replica near its
capacity, refused by a busy replica, dropped by one whose slot a user request needs. A
mirror that was never served for capacity (RESOURCE_EXHAUSTED) is not reported at all, only
counted (``ftops.gateway.mirrors_not_served``): the candidate's checks count only what was
actually mirrored. A mirror the candidate itself failed is reported as any result is.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time

from opentelemetry import metrics

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway.chooser import ARM_SHADOW, Target
from ftops_gateway.forwarder import Attempt, Forwarder, caller_deadline
from ftops_gateway.metrics_reporter import MetricsReporter
from ftops_gateway.openai_chat import inference_chat_message
from ftops_gateway.statuses import failure_origin, status_name
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_not_served = metrics.get_meter("ftops.gateway").create_counter(
    "ftops.gateway.mirrors_not_served",
    unit="{request}",
    description="Mirrored requests not served for capacity (not reported as results), by "
    "reason: in_flight (the gateway's own bound), capacity (a busy replica)",
)


def divergence(a: str, b: str) -> float:
    """1 - similarity of the two word sequences, in 0..1 (0 = the same words)."""
    left, right = a.split(), b.split()
    if not left and not right:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, left, right, autojunk=False).ratio()


class Mirror:
    """Handle of one mirrored request; the request path calls ``finish`` exactly once."""

    def __init__(self) -> None:
        self._stable: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def finish(self, stable_text: str | None) -> None:
        """The stable answer (None when the stable request failed)."""
        if not self._stable.done():
            self._stable.set_result(stable_text)

    async def stable_text(self, timeout_s: float) -> str | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._stable), timeout_s)
        except TimeoutError:
            return None


class ShadowMirror:
    def __init__(
        self,
        forwarder: Forwarder,
        reporter: MetricsReporter,
        *,
        max_in_flight: int = 64,
        timeout_s: float = 120.0,
    ) -> None:
        self._forwarder = forwarder
        self._reporter = reporter
        self._max_in_flight = max_in_flight
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # beyond max_in_flight
        self.not_served = 0  # refused or dropped for capacity

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def start(
        self, request: gateway_pb2.GenerateRequest, stable_request_id: str, candidate: Target
    ) -> Mirror | None:
        if len(self._tasks) >= self._max_in_flight:
            self.dropped += 1
            _not_served.add(1, {"reason": "in_flight"})
            return None
        mirror = Mirror()
        task = asyncio.create_task(
            self._run(request, stable_request_id, candidate, mirror), name="shadow-request"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return mirror

    async def close(self, grace_s: float = 2.0) -> None:
        """Let the mirrors in flight finish for up to ``grace_s``, then cancel the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.close_when_idle(), grace_s)
        await cancel_and_wait(list(self._tasks))

    async def close_when_idle(self) -> None:
        """Wait for the mirrors in flight to finish (tests, orderly shutdowns)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(
        self,
        request: gateway_pb2.GenerateRequest,
        stable_request_id: str,
        candidate: Target,
        mirror: Mirror,
    ) -> None:
        # Copied from the stable request's context: the client's deadline is not the
        # mirror's (nobody waits for it).
        caller_deadline.set(None)
        attempt = Attempt()
        started = time.monotonic()
        text: str | None = None
        status = "OK"
        response = inference_pb2.GenerateResponse()
        try:
            response = await asyncio.wait_for(
                self._forwarder.generate(
                    inference_pb2.GenerateRequest(
                        request_id=f"{stable_request_id}-shadow",
                        version_id=candidate.version_id,
                        prompt=request.prompt,
                        sampling=request.sampling,
                        messages=[inference_chat_message(m) for m in request.messages],
                        priority=inference_pb2.REQUEST_PRIORITY_BEST_EFFORT,
                    ),
                    attempt,
                ),
                self._timeout_s,
            )
            text = response.text
        except Exception as exc:
            status = status_name(exc)
            if status == "RESOURCE_EXHAUSTED":
                # Never served (not sent, refused or dropped for user traffic): nothing to
                # say about the candidate, so no result.
                self.not_served += 1
                _not_served.add(1, {"reason": "capacity"})
                log.debug("mirror of %s not served: %s", stable_request_id, exc)
                return
        latency_ms = (time.monotonic() - started) * 1000
        stable_text = await mirror.stable_text(self._timeout_s)
        result = events_pb2.RequestResult(
            request_id=f"{stable_request_id}-shadow",
            alias=candidate.alias,
            version_id=candidate.version_id,
            arm=ARM_SHADOW,
            latency_ms=latency_ms,
            ttft_ms=latency_ms,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            status=status,
            tenant=request.tenant,
            release_id=candidate.release_id,
            replica_id=attempt.replica,
            shadow=True,
            shadow_of=stable_request_id,
            divergence=divergence(stable_text, text)
            if text is not None and stable_text is not None
            else -1.0,
            retried=attempt.retried,
            failure_origin=failure_origin(status),
        )
        result.finished_at.GetCurrentTime()
        self._reporter.record(result)
