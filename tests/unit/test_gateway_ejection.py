"""Passive ejection of inference replicas in the gateway: a replica a call just failed on
with UNAVAILABLE is passed over while others fit, until it is heard from again or its
ejection runs out; the forwarder ejects on UNAVAILABLE only."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

import grpc
import pytest

from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2
from ftops_gateway.endpoints import EJECTION_S, SILENT_INTERVALS, Endpoint, EndpointPool
from ftops_gateway.forwarder import Attempt, Forwarder
from ftops_runtime.errors import FtopsError, InvalidArgument, NotFound, Unavailable


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _announce(
    replica: str, sent_ago_s: float = 0.0, **fields: object
) -> events_pb2.ReplicaAnnounce:
    values: dict[str, object] = {
        "replica_id": replica,
        "endpoint": f"{replica}:1",
        "serving": True,
        "heartbeat_interval_s": 2.0,
        "reason": "heartbeat",
    }
    values.update(fields)
    event = events_pb2.ReplicaAnnounce(**values)  # type: ignore[arg-type]
    event.meta.occurred_at.FromNanoseconds(int((time.time() - sent_ago_s) * 1e9))
    return event


def _picked(pool: EndpointPool, version: str = "ver_a", exclude: tuple[str, ...] = ()) -> str:
    endpoint = pool.pick(version, exclude=exclude)
    return endpoint.address if endpoint is not None else ""


# -- the pool -----------------------------------------------------------------------------


def test_an_ejected_replica_is_passed_over_for_the_other() -> None:
    pool = EndpointPool(["a:1", "b:2"], clock=_Clock())
    pool.mark_loaded("a:1", "ver_a")
    pool.add("b:2").outstanding = 5
    assert _picked(pool) == "a:1"  # loaded, though the other is idle... and busier: still a
    pool.eject("a:1", "UNAVAILABLE: connection refused")
    # Ejection outranks every preference: the busy replica without the version wins.
    assert _picked(pool) == "b:2"
    assert _picked(pool, exclude=("b:2",)) == "a:1"  # the only one left: tried anyway
    pool.eject("nowhere:9")  # unknown address: nothing to do


def test_with_all_ejected_the_best_of_them_is_still_picked() -> None:
    pool = EndpointPool(["a:1", "b:2", "c:3"], clock=_Clock())
    pool.mark_loaded("c:3", "ver_a")
    pool.add("a:1").outstanding = 2
    for address in ("a:1", "b:2", "c:3"):
        pool.eject(address)
    # Same order as without ejections: loaded first, then the least busy.
    assert _picked(pool) == "c:3"
    assert _picked(pool, "ver_b") == "b:2"
    pool.add("b:2").ejected_at = None  # one back in rotation: only it is picked
    assert _picked(pool) == "b:2"


def test_base_model_filter_holds_for_ejected_replicas() -> None:
    pool = EndpointPool(clock=_Clock())
    pool.add("tiny:1").base_fingerprint = "fp-tiny"
    pool.add("other:2").base_fingerprint = "fp-other"
    pool.eject("tiny:1")
    # The healthy replica serves another base: the ejected one that fits is tried instead.
    endpoint = pool.pick("ver_a", base_fingerprint="fp-tiny")
    assert endpoint is not None
    assert endpoint.address == "tiny:1"


def test_an_announcement_sent_after_the_ejection_ends_it() -> None:
    clock = _Clock()
    pool = EndpointPool(clock=clock)
    pool.announce(_announce("r1", loaded_versions=["ver_a"]))
    pool.announce(_announce("r2"))
    pool.eject("r1:1", "UNAVAILABLE: stream broke")
    assert _picked(pool) == "r2:1"
    clock.now += 0.5
    pool.announce(_announce("r1", loaded_versions=["ver_a"]))  # sent just now: it is back
    assert _picked(pool) == "r1:1"


def test_a_replayed_older_announcement_does_not_end_the_ejection() -> None:
    clock = _Clock()
    pool = EndpointPool(clock=clock)
    pool.announce(_announce("r1", loaded_versions=["ver_a"]))
    pool.announce(_announce("r2"))
    clock.now += 1.0
    pool.eject("r1:1")
    clock.now += 0.5
    # Arrives after the ejection but was sent before it (a second and a half ago).
    pool.announce(_announce("r1", sent_ago_s=1.5, loaded_versions=["ver_a"]))
    assert _picked(pool) == "r2:1"
    endpoint = pool.get("r1:1")
    assert endpoint is not None
    assert endpoint.ejected_at is not None


def test_an_ejection_runs_out_after_three_heartbeat_intervals() -> None:
    clock = _Clock()
    pool = EndpointPool(clock=clock)
    pool.announce(_announce("r1", heartbeat_interval_s=5.0))
    pool.eject("r1:1")
    endpoint = pool.get("r1:1")
    assert endpoint is not None
    lasts = SILENT_INTERVALS * 5.0
    assert endpoint.ejected(clock.now + lasts - 0.1)
    assert not endpoint.ejected(clock.now + lasts + 0.1)
    assert endpoint.ejected_at is None  # over: a later failure counts as a new ejection


def test_a_static_replica_is_retried_after_the_default_ejection() -> None:
    clock = _Clock()
    pool = EndpointPool(["a:1", "b:2"], clock=clock)
    pool.eject("a:1")
    clock.now += EJECTION_S - 0.1
    assert _picked(pool) == "b:2"
    clock.now += 0.2
    assert _picked(pool) == "a:1"


def test_one_log_line_per_ejection(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    pool = EndpointPool(["a:1"], clock=clock)
    with caplog.at_level(logging.INFO, logger="ftops_gateway.endpoints"):
        pool.eject("a:1", "UNAVAILABLE: connection refused")
        pool.eject("a:1", "UNAVAILABLE: connection refused")  # still ejected: extended
        clock.now += EJECTION_S + 1
        pool.eject("a:1", "UNAVAILABLE: again")  # the first ran out: a new ejection
    lines = [r.getMessage() for r in caplog.records if "ejected for" in r.getMessage()]
    assert len(lines) == 2
    assert "a:1" in lines[0]
    assert "connection refused" in lines[0]


# -- the forwarder ------------------------------------------------------------------------


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="down")


class _FakeForwarder(Forwarder):
    """Calls fail as ``fails`` says for each address; records the addresses called."""

    def __init__(self, pool: EndpointPool, fails: dict[str, BaseException]) -> None:
        super().__init__(pool, transport="unary")
        self.fails = fails
        self.called: list[str] = []
        self.mid_stream: set[str] = set()

    async def _generate_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> inference_pb2.GenerateResponse:
        self.called.append(endpoint.address)
        if (exc := self.fails.get(endpoint.address)) is not None:
            raise exc
        return inference_pb2.GenerateResponse(request_id=request.request_id, text=endpoint.address)

    async def _stream_on(
        self, endpoint: Endpoint, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        self.called.append(endpoint.address)
        if endpoint.address in self.mid_stream:
            yield inference_pb2.GenerateChunk(text="partial")
        if (exc := self.fails.get(endpoint.address)) is not None:
            raise exc
        yield inference_pb2.GenerateChunk(text=endpoint.address)


def _ejected(pool: EndpointPool, address: str) -> bool:
    endpoint = pool.get(address)
    assert endpoint is not None
    return endpoint.ejected_at is not None


async def _stream(forwarder: Forwarder, attempt: Attempt | None = None) -> list[str]:
    chunks = forwarder.generate_stream(inference_pb2.GenerateRequest(prompt="x"), attempt)
    return [chunk.text async for chunk in chunks]


@pytest.mark.parametrize(
    "error", [Unavailable("replica gone"), _rpc_error(grpc.StatusCode.UNAVAILABLE)]
)
async def test_the_next_request_goes_straight_to_the_healthy_replica(
    error: BaseException,
) -> None:
    pool = EndpointPool(["dead:1", "live:2"], clock=_Clock())
    forwarder = _FakeForwarder(pool, {"dead:1": error})
    first = Attempt()
    answer = await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"), first)
    assert (answer.text, first.retried) == ("live:2", True)
    assert _ejected(pool, "dead:1")
    forwarder.called.clear()
    for _ in range(3):
        later = Attempt()
        answer = await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"), later)
        assert (answer.text, later.retried) == ("live:2", False)
    assert await _stream(forwarder) == ["live:2"]
    assert forwarder.called == ["live:2"] * 4  # no failed first attempt any more


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad prompt"),
        NotFound("no such version"),
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT),
        _rpc_error(grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_other_errors_do_not_eject(error: BaseException) -> None:
    pool = EndpointPool(["a:1", "b:2"], clock=_Clock())
    forwarder = _FakeForwarder(pool, {"a:1": error})
    with pytest.raises((FtopsError, grpc.aio.AioRpcError)):
        await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    with pytest.raises((FtopsError, grpc.aio.AioRpcError)):
        await _stream(forwarder)
    assert forwarder.called == ["a:1", "a:1"]  # not retried, and still first choice
    assert not _ejected(pool, "a:1")


async def test_the_last_attempt_ejects_too() -> None:
    pool = EndpointPool(["a:1", "b:2", "c:3"], clock=_Clock())
    down = Unavailable("replica gone")
    forwarder = _FakeForwarder(pool, {"a:1": down, "b:2": down})
    with pytest.raises(Unavailable):
        await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    assert forwarder.called == ["a:1", "b:2"]
    assert _ejected(pool, "a:1")
    assert _ejected(pool, "b:2")
    # Two dead replicas in a row failed that request; the next one is not failed.
    answer = await forwarder.generate(inference_pb2.GenerateRequest(prompt="x"))
    assert answer.text == "c:3"


async def test_a_stream_that_fails_first_is_retried_and_ejects() -> None:
    pool = EndpointPool(["a:1", "b:2"], clock=_Clock())
    forwarder = _FakeForwarder(pool, {"a:1": Unavailable("replica gone")})
    attempt = Attempt()
    assert await _stream(forwarder, attempt) == ["b:2"]
    assert attempt.retried
    assert _ejected(pool, "a:1")


async def test_a_replica_dying_mid_stream_is_ejected() -> None:
    pool = EndpointPool(["a:1", "b:2"], clock=_Clock())
    forwarder = _FakeForwarder(pool, {"a:1": _rpc_error(grpc.StatusCode.UNAVAILABLE)})
    forwarder.mid_stream.add("a:1")
    chunks = forwarder.generate_stream(inference_pb2.GenerateRequest(prompt="x"))
    first = await anext(chunks)
    with pytest.raises(grpc.aio.AioRpcError):
        await anext(chunks)
    assert first.text == "partial"  # not retried: the client already has part of the answer
    assert forwarder.called == ["a:1"]
    assert _ejected(pool, "a:1")
    assert await _stream(forwarder) == ["b:2"]


def test_replicas_stay_usable_while_announcements_cannot_be_heard() -> None:
    clock = _Clock()
    pool = EndpointPool(clock=clock)
    pool.announce(_announce("r1"))
    pool.set_listening(False)  # the gateway's NATS connection dropped
    clock.now += 10 * SILENT_INTERVALS * 2.0  # long past the heartbeat allowance
    assert _picked(pool) == "r1:1"  # silence that could not be heard says nothing
    pool.set_listening(True)  # back: silence counts again from now, not from before
    clock.now += SILENT_INTERVALS * 2.0 - 0.5
    assert _picked(pool) == "r1:1"
    clock.now += 1.0  # still silent a whole allowance after NATS returned: gone
    assert pool.pick("ver_a") is None
    pool.announce(_announce("r1"))
    assert _picked(pool) == "r1:1"
