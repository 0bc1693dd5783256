"""The gateway's side of inference's ``Multiplex`` stream: one long-lived stream per
inference replica carries every request this gateway sends there, each tagged with an id.
A gRPC call per request costs grpc-python about twice what a message on an open stream
does, and that setup was most of what the gateway added to a request's latency.

The stream opens on first use and again after it breaks. When it breaks, every request
still waiting on it fails with UNAVAILABLE (the forwarder retries those that produced
nothing on another replica). A request whose caller gives up or whose deadline passes is
cancelled on the replica too. A replica without ``Multiplex`` (an older version during a
rolling upgrade) answers UNIMPLEMENTED once; the channel then reports ``unsupported`` and
the forwarder uses single calls for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc

from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_runtime.errors import RemoteError
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Answer = inference_pb2.MultiplexResponse | BaseException
# A stream is replaced after this long, so that the replica checks the gateway's key
# again (streams are authenticated when they open) and connections get rebalanced.
STREAM_MAX_AGE_S = 300.0
# How often deadlines are checked: a late request fails at most this much after its own.
_DEADLINE_TICK_S = 0.1
# How long opening a stream waits for the replica's headers.
_OPEN_TIMEOUT_S = 5.0
# How long a failed write waits for the stream's reader to learn why the stream ended.
_READER_VERDICT_S = 1.0


class MultiplexUnsupported(Exception):
    """The replica has no Multiplex method: send this request as a single call."""


class _Answers(asyncio.Queue[Answer]):
    """What comes back for one request, and when it must be over by."""

    def __init__(self, deadline: float, timeout_s: float) -> None:
        super().__init__()
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.expired = False


class _Stream:
    """One opened Multiplex call and the requests waiting on it."""

    def __init__(self, call: Any, opened_at: float) -> None:
        self.call = call
        self.opened_at = opened_at
        self.pending: dict[int, _Answers] = {}
        self.reader: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None


class MultiplexChannel:
    def __init__(
        self,
        stub: inference_pb2_grpc.InferenceServiceStub,
        *,
        address: str,
        metadata: tuple[tuple[str, str], ...] = (),
        max_age_s: float = STREAM_MAX_AGE_S,
    ) -> None:
        self._stub = stub
        self._address = address
        self._max_age_s = max_age_s
        self._metadata = metadata
        self._stream: _Stream | None = None
        self._write_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self.unsupported = False

    @property
    def open(self) -> bool:
        """Whether a stream is up (it opens on the next request otherwise)."""
        return self._stream is not None

    # -- requests ----------------------------------------------------------------------

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        *,
        timeout_s: float,
        trace_context: Mapping[str, str],
    ) -> inference_pb2.GenerateResponse:
        stream, request_id, answers = await self._send(
            inference_pb2.MultiplexRequest(generate=request, trace_context=trace_context),
            timeout_s,
        )
        finished = False
        try:
            answer = _unwrap(await answers.get())
            finished = True
            if answer.WhichOneof("kind") == "response":
                return answer.response
            raise _error(answer)
        finally:
            self._done(stream, request_id, cancel=not finished)

    async def generate_stream(
        self,
        request: inference_pb2.GenerateRequest,
        *,
        timeout_s: float,
        trace_context: Mapping[str, str],
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        stream, request_id, answers = await self._send(
            inference_pb2.MultiplexRequest(generate_stream=request, trace_context=trace_context),
            timeout_s,
        )
        finished = False
        try:
            while True:
                answer = _unwrap(await answers.get())
                if answer.WhichOneof("kind") == "chunk":
                    yield answer.chunk
                    continue
                finished = True
                if answer.end.code != grpc.StatusCode.OK.value[0]:
                    raise _error(answer)
                return
        finally:
            self._done(stream, request_id, cancel=not finished)

    # -- the stream --------------------------------------------------------------------

    async def _send(
        self, message: inference_pb2.MultiplexRequest, timeout_s: float
    ) -> tuple[_Stream, int, _Answers]:
        if self.unsupported:
            raise MultiplexUnsupported(self._address)
        message.id = request_id = next(self._ids)
        answers = _Answers(asyncio.get_running_loop().time() + timeout_s, timeout_s)
        failed: Exception | None = None
        async with self._write_lock:
            if self.unsupported:  # learnt while this request waited for the lock
                raise MultiplexUnsupported(self._address)
            stream = self._current() or await self._open()
            stream.pending[request_id] = answers
            try:
                await stream.call.write(message)
            except Exception as exc:
                failed = exc
            except BaseException:
                stream.pending.pop(request_id, None)
                raise
        if failed is not None:
            stream.pending.pop(request_id, None)
            raise await self._write_failed(stream, failed) from failed
        return stream, request_id, answers

    def _current(self) -> _Stream | None:
        stream = self._stream
        if stream is None or asyncio.get_running_loop().time() - stream.opened_at < self._max_age_s:
            return stream
        # Old enough: new requests go on a new stream; this one is closed for sending, so
        # the replica answers what it has and ends it.
        self._stream = None
        self._background_task(self._retire(stream))
        return None

    async def _retire(self, stream: _Stream) -> None:
        try:
            async with self._write_lock:
                await stream.call.done_writing()
        except Exception as exc:  # already over
            log.debug("retiring a stream to %s: %r", self._address, exc)

    def _background_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _open(self) -> _Stream:
        # The replica answers a new stream with its headers at once: waiting for them tells
        # an old replica (UNIMPLEMENTED) from a live stream before any request rides on it.
        call = self._stub.Multiplex(metadata=self._metadata)
        try:
            async with asyncio.timeout(_OPEN_TIMEOUT_S):
                await call.initial_metadata()
            code = await call.code() if call.done() else grpc.StatusCode.OK
            details = (await call.details()) if call.done() else ""
        except TimeoutError:
            call.cancel()
            code, details = grpc.StatusCode.UNAVAILABLE, f"no answer in {_OPEN_TIMEOUT_S:g} s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info("inference %s has no Multiplex; using single calls", self._address)
            self.unsupported = True
            raise MultiplexUnsupported(self._address)
        if code != grpc.StatusCode.OK:
            raise RemoteError(
                grpc.StatusCode.UNAVAILABLE,
                f"no stream to inference {self._address}: {code.name} {details or ''}".rstrip(),
            )
        stream = _Stream(call, asyncio.get_running_loop().time())
        stream.reader = asyncio.create_task(self._read(stream), name="multiplex-reader")
        stream.watchdog = asyncio.create_task(self._watch(stream), name="multiplex-deadlines")
        self._stream = stream
        return stream

    async def _watch(self, stream: _Stream) -> None:
        # One timer per stream instead of one per request (asyncio.timeout's per-request
        # timer was a measurable share of the gateway's work on a short request).
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_DEADLINE_TICK_S)
            now = loop.time()
            for answers in stream.pending.values():
                if not answers.expired and now >= answers.deadline:
                    answers.expired = True
                    answers.put_nowait(
                        RemoteError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"inference {self._address} did not finish within "
                            f"{answers.timeout_s:g} s",
                        )
                    )

    async def _write_failed(self, stream: _Stream, exc: Exception) -> Exception:
        # A write fails once the stream is over; its reader learns why (an old replica's
        # UNIMPLEMENTED must not read as a broken replica, or the request would move on).
        if stream.reader is not None:
            await asyncio.wait({stream.reader}, timeout=_READER_VERDICT_S)
        if self.unsupported:
            return MultiplexUnsupported(self._address)
        return RemoteError(
            grpc.StatusCode.UNAVAILABLE, f"stream to inference {self._address} is broken: {exc!r}"
        )

    async def _read(self, stream: _Stream) -> None:
        failure: BaseException = RemoteError(
            grpc.StatusCode.UNAVAILABLE, f"the gateway closed its stream to {self._address}"
        )
        try:
            async for answer in stream.call:
                answers = stream.pending.get(answer.id)
                if answers is not None:
                    answers.put_nowait(answer)
            failure = RemoteError(
                grpc.StatusCode.UNAVAILABLE, f"inference {self._address} ended the stream"
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("inference %s has no Multiplex; using single calls", self._address)
                self.unsupported = True
                failure = MultiplexUnsupported(self._address)
            else:
                failure = RemoteError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"stream to inference {self._address} broke: "
                    f"{exc.code().name} {exc.details() or ''}".rstrip(),
                )
        finally:
            if self._stream is stream:
                self._stream = None
            if stream.watchdog is not None:
                stream.watchdog.cancel()
            for answers in stream.pending.values():
                answers.put_nowait(failure)
            stream.pending.clear()

    def _done(self, stream: _Stream, request_id: int, *, cancel: bool) -> None:
        if stream.pending.pop(request_id, None) is None or not cancel:
            return
        # The caller left before the end (cancelled, timed out, or stopped reading a
        # stream): tell the replica so it frees the slot. Never awaited by the caller.
        self._background_task(self._cancel(stream, request_id))

    async def _cancel(self, stream: _Stream, request_id: int) -> None:
        try:
            async with self._write_lock:
                if not stream.call.done():
                    await stream.call.write(
                        inference_pb2.MultiplexRequest(id=request_id, cancel=True)
                    )
        except Exception as exc:  # the stream is gone, and the request with it
            log.debug("cancel of request %d not sent: %r", request_id, exc)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        tasks = list(self._background)
        if stream is not None:
            stream.call.cancel()
            tasks.extend(t for t in (stream.reader, stream.watchdog) if t is not None)
        await cancel_and_wait(tasks)


def _unwrap(answer: Answer) -> inference_pb2.MultiplexResponse:
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _error(answer: inference_pb2.MultiplexResponse) -> RemoteError:
    code = _CODES.get(answer.end.code, grpc.StatusCode.UNKNOWN)
    return RemoteError(
        code, answer.end.message or code.name, retry_after_ms=answer.end.retry_after_ms
    )


_CODES = {code.value[0]: code for code in grpc.StatusCode}
