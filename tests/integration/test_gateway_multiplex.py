"""The gateway's multiplexed stream to inference over real gRPC sockets: many requests on
one stream answered out of order, errors with their codes, cancellation and deadlines that
free the replica's slot, a stream that breaks (UNAVAILABLE, then a fresh stream), and an
older replica without the stream (single calls instead)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_gateway.endpoints import EndpointPool
from ftops_gateway.forwarder import Attempt, Forwarder
from ftops_gateway.multiplexer import MultiplexChannel
from ftops_inference.multiplex import MultiplexSession
from ftops_runtime.errors import NotFound, RemoteError

pytestmark = pytest.mark.integration


class Replica(inference_pb2_grpc.InferenceServiceServicer):
    """Answers after ``delay:<seconds>`` in the prompt; ``missing`` is NOT_FOUND; records
    which requests started, finished and were cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.unary_calls = 0
        self.sessions: list[MultiplexSession] = []

    async def _answer(self, request: inference_pb2.GenerateRequest) -> str:
        self.started.append(request.request_id)
        if request.version_id == "missing":
            raise NotFound(f"version {request.version_id!r} is not registered")
        if request.prompt.startswith("delay:"):
            try:
                await asyncio.sleep(float(request.prompt.split(":")[1]))
            except asyncio.CancelledError:
                self.cancelled.append(request.request_id)
                raise
        return f"{request.request_id}:{request.prompt}"

    async def _generate(
        self, request: inference_pb2.GenerateRequest
    ) -> inference_pb2.GenerateResponse:
        text = await self._answer(request)
        return inference_pb2.GenerateResponse(request_id=request.request_id, text=text)

    async def _stream(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        text = await self._answer(request)
        for piece in text.split(":"):
            yield inference_pb2.GenerateChunk(request_id=request.request_id, text=piece)
        if request.prompt == "break-after-first":
            raise RuntimeError("backend crashed mid-stream")

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        self.unary_calls += 1
        return await self._generate(request)

    async def Multiplex(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        await context.send_initial_metadata(())
        session = MultiplexSession(self._generate, self._stream)
        self.sessions.append(session)
        async for answer in session.serve(request_iterator):
            yield answer


class OldReplica(inference_pb2_grpc.InferenceServiceServicer):
    """A replica from before the stream existed: single calls only."""

    def __init__(self) -> None:
        self.unary_calls = 0

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        self.unary_calls += 1
        return inference_pb2.GenerateResponse(request_id=request.request_id, text="old")


async def _serve(servicer: Any, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@contextlib.asynccontextmanager
async def _mux_to(replica: Replica, **options: Any) -> AsyncIterator[MultiplexChannel]:
    """A replica served on a free port, and the gateway's stream to it."""
    server, port = await _serve(replica)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            mux = MultiplexChannel(
                inference_pb2_grpc.InferenceServiceStub(ch), address="r", **options
            )
            try:
                yield mux
            finally:
                await mux.close()
    finally:
        await server.stop(0)


def _request(request_id: str, prompt: str, version_id: str = "") -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=request_id, prompt=prompt, version_id=version_id
    )


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_requests_share_one_stream_and_get_their_own_answers() -> None:
    replica = Replica()  # type: ignore[abstract]
    async with _mux_to(replica) as mux:
        slow = asyncio.create_task(
            mux.generate(_request("a", "delay:0.3"), timeout_s=5, trace_context={})
        )
        await _until(lambda: "a" in replica.started)
        fast = await asyncio.gather(
            *(
                mux.generate(_request(f"f{i}", "hi"), timeout_s=5, trace_context={})
                for i in range(20)
            )
        )
        assert not slow.done()  # answered out of order: the fast ones did not wait
        assert [r.text for r in fast] == [f"f{i}:hi" for i in range(20)]
        assert (await slow).text == "a:delay:0.3"
        chunks = [
            c.text
            async for c in mux.generate_stream(_request("s", "x"), timeout_s=5, trace_context={})
        ]
        assert chunks == ["s", "x"]
        assert replica.unary_calls == 0


async def test_errors_keep_their_code_and_message() -> None:
    replica = Replica()  # type: ignore[abstract]
    async with _mux_to(replica) as mux:
        with pytest.raises(RemoteError) as err:
            await mux.generate(_request("m", "x", "missing"), timeout_s=5, trace_context={})
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert "'missing' is not registered" in str(err.value)

        received: list[str] = []

        async def read_all() -> None:
            async for chunk in mux.generate_stream(
                _request("b", "break-after-first"), timeout_s=5, trace_context={}
            ):
                received.append(chunk.text)

        with pytest.raises(RemoteError) as err:
            await read_all()
        assert received == ["b", "break-after-first"]
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert "backend crashed" not in str(err.value)  # internals are not leaked
        # The stream survives a request's failure.
        assert (await mux.generate(_request("ok", "x"), timeout_s=5, trace_context={})).text


async def test_cancelled_and_late_requests_free_their_slot_on_the_replica() -> None:
    replica = Replica()  # type: ignore[abstract]
    async with _mux_to(replica) as mux:
        waiting = asyncio.create_task(
            mux.generate(_request("gone", "delay:30"), timeout_s=60, trace_context={})
        )
        await _until(lambda: "gone" in replica.started)
        waiting.cancel()  # the gateway's caller hung up
        await _until(lambda: "gone" in replica.cancelled)

        with pytest.raises(RemoteError) as err:
            await mux.generate(_request("late", "delay:30"), timeout_s=0.2, trace_context={})
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: "late" in replica.cancelled)

        chunks = mux.generate_stream(_request("left", "delay:30"), timeout_s=60, trace_context={})
        reading = asyncio.create_task(chunks.__anext__())
        await _until(lambda: "left" in replica.started)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await chunks.aclose()
        await _until(lambda: "left" in replica.cancelled)


async def test_a_broken_stream_fails_its_requests_as_unavailable_then_reopens() -> None:
    replica = Replica()  # type: ignore[abstract]
    server, port = await _serve(replica)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        mux = MultiplexChannel(inference_pb2_grpc.InferenceServiceStub(ch), address="r")
        try:
            waiting = asyncio.create_task(
                mux.generate(_request("w", "delay:30"), timeout_s=60, trace_context={})
            )
            await _until(lambda: "w" in replica.started)
            await server.stop(0)  # the replica dies with a request in flight
            with pytest.raises(RemoteError) as err:
                await waiting
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # retryable elsewhere

            server, _ = await _serve(replica, port)  # back on the same address
            answer = await mux.generate(_request("again", "x"), timeout_s=10, trace_context={})
            assert answer.text == "again:x"
        finally:
            await mux.close()
    await server.stop(0)


async def test_forwarder_retries_on_another_replica_and_uses_single_calls_for_old_ones() -> None:
    old = OldReplica()  # type: ignore[abstract]
    old_server, old_port = await _serve(old)
    new = Replica()  # type: ignore[abstract]
    new_server, new_port = await _serve(new)
    pool = EndpointPool([f"127.0.0.1:{old_port}"])
    forwarder = Forwarder(pool)
    try:
        for _ in range(3):
            answer = await forwarder.generate(_request("r", "x"))
            assert answer.text == "old"
        assert old.unary_calls == 3

        # A dead replica first, a live one second: the request moves on and is answered.
        await old_server.stop(0)
        pool = EndpointPool([f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}"])
        forwarder = Forwarder(pool)
        pool.get(f"127.0.0.1:{new_port}").outstanding = 1  # type: ignore[union-attr]
        answer = await forwarder.generate(_request("moved", "x"))
        assert answer.text == "moved:x"
        assert new.unary_calls == 0
        # The failure ejected the dead replica: the next request goes straight to the live one.
        attempt = Attempt()
        answer = await forwarder.generate(_request("next", "x"), attempt)
        assert (answer.text, attempt.retried) == ("next:x", False)
    finally:
        await pool.close()
        await new_server.stop(0)
        await old_server.stop(0)


async def test_a_stopping_replica_answers_what_it_has_then_ends_the_stream() -> None:
    replica = Replica()  # type: ignore[abstract]
    server, port = await _serve(replica)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        mux = MultiplexChannel(inference_pb2_grpc.InferenceServiceStub(ch), address="r")
        try:
            waiting = asyncio.create_task(
                mux.generate(_request("w", "delay:0.3"), timeout_s=10, trace_context={})
            )
            await _until(lambda: "w" in replica.started)
            replica.sessions[0].finish()
            assert (await waiting).text == "w:delay:0.3"  # in flight: answered
            await _until(lambda: not mux.open)  # then the replica ended the stream
            # The ended stream is replaced by a new one for the next request.
            answer = await mux.generate(_request("n", "x"), timeout_s=10, trace_context={})
            assert answer.text == "n:x"
            assert len(replica.sessions) == 2
        finally:
            await mux.close()
    # Nothing holds the server's graceful stop: no stream is left open.
    started = asyncio.get_running_loop().time()
    replica.sessions[-1].finish()
    await server.stop(grace=10)
    assert asyncio.get_running_loop().time() - started < 5


async def test_an_old_stream_is_replaced_without_failing_its_requests() -> None:
    replica = Replica()  # type: ignore[abstract]
    async with _mux_to(replica, max_age_s=0.2) as mux:
        waiting = asyncio.create_task(
            mux.generate(_request("w", "delay:0.5"), timeout_s=10, trace_context={})
        )
        await _until(lambda: "w" in replica.started)
        await asyncio.sleep(0.25)
        # Past its age: this request opens a new stream; the old one is closed for
        # sending and still answers what it has.
        answer = await mux.generate(_request("n", "x"), timeout_s=10, trace_context={})
        assert answer.text == "n:x"
        assert len(replica.sessions) == 2
        assert (await waiting).text == "w:delay:0.5"
