"""The gateway under load: a replica's capacity refusal goes to another replica with room
(never back to the refusing one, which is not ejected), mirrors back off from busy
replicas, refusals carry their retry advice, and every result says where a failure arose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import grpc
import pytest

from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway.endpoints import Endpoint, EndpointPool
from ftops_gateway.forwarder import Attempt, Forwarder, MirrorSkipped, caller_deadline
from ftops_gateway.openai_errors import from_exception
from ftops_gateway.statuses import failure_origin
from ftops_runtime.errors import RemoteError, ResourceExhausted, Unavailable, retry_after_ms_of

FULL = ResourceExhausted("16 requests running and 64 waiting", retry_after_ms=250)


class _Forwarder(Forwarder):
    """Calls fail as ``fails`` says for each address; records the addresses called."""

    def __init__(self, pool: EndpointPool, fails: dict[str, BaseException]) -> None:
        super().__init__(pool, transport="unary")
        self.fails = fails
        self.called: list[str] = []
        self.timeouts_ms: list[int] = []

    async def _generate_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> inference_pb2.GenerateResponse:
        self.called.append(endpoint.address)
        self.timeouts_ms.append(request.timeout_ms)
        if (exc := self.fails.get(endpoint.address)) is not None:
            raise exc
        return inference_pb2.GenerateResponse(text=endpoint.address)

    async def _stream_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        self.called.append(endpoint.address)
        if (exc := self.fails.get(endpoint.address)) is not None:
            raise exc
        yield inference_pb2.GenerateChunk(text=endpoint.address)


def _announced(pool: EndpointPool, name: str, *, capacity: int, in_flight: int) -> None:
    pool.announce(
        events_pb2.ReplicaAnnounce(
            replica_id=name,
            endpoint=f"{name}:1",
            serving=True,
            heartbeat_interval_s=2.0,
            max_concurrent=capacity,
            in_flight=in_flight,
        )
    )


async def test_a_capacity_refusal_goes_to_another_replica_without_ejecting() -> None:
    pool = EndpointPool(["full:1", "idle:2"])
    forwarder = _Forwarder(pool, {"full:1": FULL})
    attempt = Attempt()
    answer = await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"), attempt)
    assert (answer.text, attempt.retried) == ("idle:2", True)
    endpoint = pool.get("full:1")
    assert endpoint is not None
    assert endpoint.ejected_at is None
    chunks = [c.text async for c in forwarder.generate_stream(inference_pb2.GenerateRequest())]
    assert chunks == ["idle:2"]
    assert forwarder.called == ["full:1", "idle:2", "full:1", "idle:2"]


async def test_a_capacity_refusal_is_not_retried_on_the_same_replica() -> None:
    pool = EndpointPool(["only:1"])
    forwarder = _Forwarder(pool, {"only:1": FULL})
    with pytest.raises(ResourceExhausted) as refused:
        await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    assert refused.value.retry_after_ms == 250  # the replica's advice reaches the caller
    assert forwarder.called == ["only:1"]


async def test_a_capacity_refusal_is_not_sent_to_a_replica_without_room() -> None:
    pool = EndpointPool()
    _announced(pool, "a", capacity=4, in_flight=0)
    _announced(pool, "b", capacity=4, in_flight=4)  # announced full
    forwarder = _Forwarder(pool, {"a:1": FULL})
    with pytest.raises(ResourceExhausted):
        await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    assert forwarder.called == ["a:1"]


async def test_requests_carry_the_time_they_have_left() -> None:
    pool = EndpointPool(["a:1"])
    forwarder = _Forwarder(pool, {})
    await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    assert 0 < forwarder.timeouts_ms[0] <= 120_000


async def test_requests_carry_the_clients_deadline_when_it_is_sooner() -> None:
    pool = EndpointPool(["a:1"])
    forwarder = _Forwarder(pool, {})

    async def served_with_deadline() -> None:
        # Set by the front end that took the request, in that request's context only.
        caller_deadline.set(time.monotonic() + 0.5)
        await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))

    await asyncio.create_task(served_with_deadline())
    assert 0 < forwarder.timeouts_ms[0] <= 500
    await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))  # another request
    assert forwarder.timeouts_ms[1] > 100_000


async def test_mirrors_are_not_sent_to_a_busy_replica() -> None:
    pool = EndpointPool()
    _announced(pool, "a", capacity=16, in_flight=12)  # 75%: busy for best-effort traffic
    forwarder = _Forwarder(pool, {})
    mirror = inference_pb2.GenerateRequest(
        prompt="x", priority=inference_pb2.REQUEST_PRIORITY_BEST_EFFORT
    )
    with pytest.raises(MirrorSkipped, match="busy"):
        await forwarder.generate(mirror)
    assert forwarder.called == []
    # A user request still goes there (it queues at the replica).
    await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    _announced(pool, "a", capacity=16, in_flight=3)
    assert (await forwarder.generate(mirror)).text == "a:1"


class _HeldForwarder(_Forwarder):
    """Answers only once ``release`` is set: a mirror stays in flight meanwhile."""

    def __init__(self, pool: EndpointPool, fails: dict[str, BaseException]) -> None:
        super().__init__(pool, fails)
        self.release = asyncio.Event()

    async def _generate_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> inference_pb2.GenerateResponse:
        answer = await super()._generate_on(endpoint, request)
        await self.release.wait()
        return answer


def _mirror() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt="x", priority=inference_pb2.REQUEST_PRIORITY_BEST_EFFORT
    )


async def test_one_mirror_in_flight_per_replica_the_rest_are_not_sent() -> None:
    pool = EndpointPool()
    _announced(pool, "a", capacity=16, in_flight=0)
    forwarder = _HeldForwarder(pool, {})
    first = asyncio.create_task(forwarder.generate(_mirror()))
    await asyncio.sleep(0.01)
    with pytest.raises(MirrorSkipped, match="1 mirrors in flight"):
        await forwarder.generate(_mirror())
    # User requests are not bounded by it.
    user = asyncio.create_task(forwarder.generate(inference_pb2.GenerateRequest(prompt="x")))
    await asyncio.sleep(0.01)
    forwarder.release.set()
    await asyncio.gather(first, user)
    assert forwarder.called == ["a:1", "a:1"]
    assert (await forwarder.generate(_mirror())).text == "a:1"  # its turn again
    endpoint = pool.get("a:1")
    assert endpoint is not None
    assert endpoint.best_effort_outstanding == 0


async def test_a_replica_that_refused_a_mirror_gets_none_for_its_advised_wait() -> None:
    pool = EndpointPool()
    _announced(pool, "a", capacity=16, in_flight=0)
    refused = ResourceExhausted("best-effort request refused", retry_after_ms=200)
    forwarder = _Forwarder(pool, {"a:1": refused})
    with pytest.raises(ResourceExhausted):
        await forwarder.generate(_mirror())
    forwarder.fails.clear()
    with pytest.raises(MirrorSkipped):
        await forwarder.generate(_mirror())
    assert forwarder.called == ["a:1"]  # the second was never sent
    # User requests still go; after the wait, mirrors do again.
    await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    await asyncio.sleep(0.25)
    assert (await forwarder.generate(_mirror())).text == "a:1"


@pytest.mark.parametrize(
    ("status", "origin"),
    [
        ("OK", ""),
        ("RESOURCE_EXHAUSTED", "capacity"),
        ("UNAVAILABLE", "transport"),
        ("DEADLINE_EXCEEDED", "deadline"),
        ("INTERNAL", "replica"),
        ("NOT_FOUND", "replica"),
    ],
)
def test_failure_origin_by_status(status: str, origin: str) -> None:
    assert failure_origin(status) == origin


def test_retry_advice_reaches_http_headers() -> None:
    refused = from_exception(ResourceExhausted("full", retry_after_ms=1200))
    assert refused.status == 429
    assert refused.headers() == {"Retry-After": "2", "retry-after-ms": "1200"}
    relayed = RemoteError(grpc.StatusCode.UNAVAILABLE, "draining", retry_after_ms=100)
    assert from_exception(relayed).headers()["Retry-After"] == "1"
    # From a replica's single call: its trailing metadata.
    rpc = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("retry-after-ms", "300")),
        details="queue full",
    )
    assert retry_after_ms_of(rpc) == 300
    assert from_exception(rpc).headers()["retry-after-ms"] == "300"
    # Advice only on refusals.
    assert from_exception(Unavailable("x")).headers()["Retry-After"] == "1"
    assert from_exception(RemoteError(grpc.StatusCode.INTERNAL, "boom")).headers() == {}
