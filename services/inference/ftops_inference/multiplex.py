"""Serves the ``Multiplex`` stream: many Generate / GenerateStream requests over one gRPC
stream (the gateway's data plane). Setting up a gRPC call costs grpc-python more than the
rest of a short request's work in the gateway and here; a message on an open stream costs a
fraction of it.

Each request runs as its own task through the same code as the single calls
(access check, admission limits, drain, metrics), with its own span from the trace context
it carries. Answers are written in the order they finish. A request the sender cancels, or
every request of a stream that breaks, is cancelled at once, freeing its slot.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from ftops.inference.v1 import inference_pb2
from ftops_runtime.errors import retry_after_ms_of
from ftops_runtime.interceptors import record_call, server_span, status_of
from ftops_runtime.tasks import cancel_and_wait

_SERVICE = "/ftops.inference.v1.InferenceService/"
GENERATE = _SERVICE + "Generate"
GENERATE_STREAM = _SERVICE + "GenerateStream"

_End = inference_pb2.MultiplexStatus
Generate = Callable[[inference_pb2.GenerateRequest], Awaitable[inference_pb2.GenerateResponse]]
GenerateStream = Callable[
    [inference_pb2.GenerateRequest], AsyncIterator[inference_pb2.GenerateChunk]
]


def _end(
    request_id: int, code: grpc.StatusCode, message: str = "", retry_after_ms: int = 0
) -> inference_pb2.MultiplexResponse:
    return inference_pb2.MultiplexResponse(
        id=request_id,
        end=_End(code=code.value[0], message=message, retry_after_ms=retry_after_ms),
    )


class MultiplexSession:
    """One open Multiplex stream."""

    def __init__(self, generate: Generate, generate_stream: GenerateStream) -> None:
        self._generate = generate
        self._generate_stream = generate_stream
        self._out: asyncio.Queue[inference_pb2.MultiplexResponse | None] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._finishing = False
        self._input_done = False

    def finish(self) -> None:
        """Take no more requests (the replica is stopping): answer those in flight, then
        end the stream, so that the server's graceful stop need not wait it out."""
        self._finishing = True
        self._out.put_nowait(None)

    async def serve(
        self, requests: AsyncIterator[inference_pb2.MultiplexRequest]
    ) -> AsyncIterator[inference_pb2.MultiplexResponse]:
        reader = asyncio.create_task(self._read(requests), name="multiplex-reader")
        try:
            while True:
                answer = await self._out.get()
                if answer is not None:
                    yield answer
                elif (self._finishing or self._input_done) and not self._tasks:
                    return
        finally:
            # The stream ended or broke (the sender went away): nobody will read the
            # answers of what is still running, so free its slots now. (The reader is
            # cancelled, never the other way round: cancelling a pending read breaks
            # the call, answers still on their way included.)
            await cancel_and_wait([reader, *self._tasks.values()])

    async def _read(self, requests: AsyncIterator[inference_pb2.MultiplexRequest]) -> None:
        try:
            async for message in requests:
                self._dispatch(message)
        finally:
            # The sender closed its side: answer what is in flight, then end the stream.
            self._input_done = True
            self._out.put_nowait(None)

    def _dispatch(self, message: inference_pb2.MultiplexRequest) -> None:
        kind = message.WhichOneof("kind")
        if kind == "cancel":
            task = self._tasks.pop(message.id, None)
            if task is not None:
                task.cancel()
            return
        if kind not in ("generate", "generate_stream"):
            self._out.put_nowait(
                _end(message.id, grpc.StatusCode.INVALID_ARGUMENT, "request has no kind")
            )
            return
        if self._finishing:
            self._out.put_nowait(
                _end(
                    message.id,
                    grpc.StatusCode.UNAVAILABLE,
                    "this replica is stopping; retry on another",
                )
            )
            return
        if message.id in self._tasks:
            self._out.put_nowait(
                _end(
                    message.id,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request id {message.id} is already in flight on this stream",
                )
            )
            return
        task = asyncio.create_task(self._run(message, kind == "generate_stream"))
        self._tasks[message.id] = task
        task.add_done_callback(functools.partial(self._forget, message.id))

    def _forget(self, request_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
        if self._finishing or self._input_done:
            self._out.put_nowait(None)  # the stream may be over now: serve() checks

    async def _run(self, message: inference_pb2.MultiplexRequest, streaming: bool) -> None:
        method = GENERATE_STREAM if streaming else GENERATE
        request = message.generate_stream if streaming else message.generate
        started = time.perf_counter()
        with server_span(method, message.trace_context) as span:
            code, details = grpc.StatusCode.OK, ""
            try:
                if streaming:
                    async for chunk in self._generate_stream(request):
                        self._out.put_nowait(
                            inference_pb2.MultiplexResponse(id=message.id, chunk=chunk)
                        )
                    self._out.put_nowait(_end(message.id, grpc.StatusCode.OK))
                else:
                    response = await self._generate(request)
                    self._out.put_nowait(
                        inference_pb2.MultiplexResponse(id=message.id, response=response)
                    )
            except asyncio.CancelledError:
                code, details = grpc.StatusCode.CANCELLED, "cancelled by the sender"
                raise
            except Exception as exc:
                code, details = status_of(exc, method)
                self._out.put_nowait(_end(message.id, code, details, retry_after_ms_of(exc)))
            finally:
                record_call(span, method, code, details, started)
