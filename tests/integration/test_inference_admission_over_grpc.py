"""A replica's admission over real gRPC (echo backend): a burst beyond its slots waits in
the queue instead of failing, and a request whose deadline is shorter than its expected
wait is refused at once, with how long to wait, on single calls and multiplexed ones."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from test_inference_replica import Replica, start_replica  # type: ignore[import-not-found]

from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2

pytestmark = pytest.mark.integration
__all__ = ["start_replica"]  # the fixture, shared with test_inference_replica


def _request(prompt: str = "one two three four", **fields: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=4), **fields
    )


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_burst_of_40_beyond_16_slots_is_served_without_a_failure(
    start_replica: Callable[..., Any],
) -> None:
    # Default admission settings: 16 slots, a queue in front of them.
    replica: Replica = await start_replica(backend="echo", echo_token_delay_ms=20)
    admission = replica.service.core.admission
    most_waiting = 0

    async def watch() -> None:
        nonlocal most_waiting
        while True:
            most_waiting = max(most_waiting, admission.waiting)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        replies = await asyncio.gather(
            *(replica.stub.Generate(_request(f"burst {i} a b c"), timeout=30) for i in range(40)),
            return_exceptions=True,
        )
    finally:
        watcher.cancel()
    failures = [r for r in replies if isinstance(r, BaseException)]
    assert failures == []
    served = [r for r in replies if not isinstance(r, BaseException)]
    assert {r.text.split()[1] for r in served} == {str(i) for i in range(40)}
    assert most_waiting > 0  # the burst went beyond the slots and waited its turn
    assert admission.in_flight == 0


async def test_a_deadline_shorter_than_the_queue_is_refused_at_once(
    start_replica: Callable[..., Any],
) -> None:
    # One slot, 4 tokens at 100 ms: about 0.4 s a request.
    replica: Replica = await start_replica(
        backend="echo", echo_token_delay_ms=100, max_concurrent_requests=1
    )
    admission = replica.service.core.admission
    await replica.stub.Generate(_request(), timeout=30)  # learns the service time

    async def generate() -> inference_pb2.GenerateResponse:
        reply: inference_pb2.GenerateResponse = await replica.stub.Generate(_request(), timeout=30)
        return reply

    held = [asyncio.create_task(generate()) for _ in range(2)]
    await _until(lambda: admission.waiting == 1)

    # Expected wait ~0.8 s (one running, one waiting); the call has 0.3 s.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.Generate(_request(), timeout=0.3)
    # Refused by admission, not timed out in the queue.
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shorter than its expected wait" in (refused.value.details() or "")
    advice = dict(refused.value.trailing_metadata() or ())
    assert int(advice["retry-after-ms"]) > 0

    # The same over the multiplexed stream, with the deadline the request carries.
    stream = replica.stub.Multiplex()
    await stream.write(inference_pb2.MultiplexRequest(id=7, generate=_request(timeout_ms=300)))
    answer = await stream.read()
    assert answer.id == 7
    assert answer.end.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "deadline" in answer.end.message
    assert answer.end.retry_after_ms > 0
    await stream.done_writing()
    stream.cancel()

    replies = await asyncio.gather(*held)
    assert [r.text for r in replies] == ["one two three four"] * 2
    assert admission.waiting == 0
