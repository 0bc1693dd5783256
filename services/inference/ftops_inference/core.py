"""The inference service without gRPC: request validation, admission control, on-demand
adapter loads, generation with per-version metrics, drain, and injected faults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator

from ftops.common.v1 import common_pb2
from ftops_inference.backend import Backend, Chunk, Completion, GenerationRequest
from ftops_inference.faults import Faults
from ftops_inference.loader import AdapterLoader, AdapterRecord, LoadResult
from ftops_inference.metrics import ServingMetrics
from ftops_inference.sampling import sampling_from_proto
from ftops_runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

BASE_REFS = ("", "base")
# Called when a version becomes loaded outside the adapter.ready path (so the gateway
# learns about on-demand loads too).
LoadedHook = Callable[[AdapterRecord], Awaitable[None]]


class InferenceCore:
    def __init__(
        self,
        backend: Backend,
        *,
        max_prompt_tokens: int,
        max_new_tokens_limit: int,
        default_max_tokens: int,
        max_concurrent_requests: int,
        faults: Faults | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.loader: AdapterLoader | None = None  # set once the base model is known
        self.on_loaded: LoadedHook | None = None
        self.faults = faults or Faults()
        self.metrics = metrics or ServingMetrics()
        self.draining = False
        self._max_prompt_tokens = max_prompt_tokens
        self._max_new_tokens_limit = max_new_tokens_limit
        self._default_max_tokens = default_max_tokens
        self.max_concurrent = max_concurrent_requests
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is in flight (drain)."""
        await self._idle.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def serving(self) -> bool:
        """Ready for new requests: model up, not draining, not crashed."""
        return (
            self.loader is not None
            and self.backend.ready
            and not self.draining
            and self.backend.failure is None
        )

    def _require_loader(self) -> AdapterLoader:
        if self.loader is None or not self.backend.ready:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.loader

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        if self.draining:
            raise Unavailable("this replica is draining for shutdown; retry on another")
        failure = self.backend.failure
        if failure is not None:
            raise Unavailable(f"this replica's model failed and is recovering ({failure})")
        # Counted from admission to the last token, queued requests included, so a
        # burst is refused at once instead of timing out in a queue.
        if self._in_flight >= self.max_concurrent:
            raise ResourceExhausted(
                f"{self._in_flight} requests in flight, the limit is {self.max_concurrent}; "
                "retry later"
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    # -- adapters --------------------------------------------------------------------

    async def load(
        self, ref: str, *, announce: bool = True, background: bool = False
    ) -> LoadResult:
        """Load ``ref``; ``background`` for a prefetch nobody waits for (it yields to
        serving, see the load_duty_cycle setting)."""
        result = await self._require_loader().ensure_loaded(ref, background=background)
        if result.newly_loaded and announce and self.on_loaded is not None:
            try:
                await self.on_loaded(result.record)
            except Exception as exc:  # announcing is best effort; the load stands
                log.warning("could not announce %s: %r", result.record.version_id, exc)
        return result

    async def unload(self, ref: str) -> AdapterRecord:
        return await self._require_loader().unload(ref)

    async def retire(self, version_id: str) -> bool:
        """adapter.retired: unload if held here; False when there was nothing to do."""
        loader = self._require_loader()
        if loader.loaded_id(version_id) is None:
            return False
        await loader.unload(version_id)
        return True

    def adapters(self) -> list[AdapterRecord]:
        return list(self.loader.records.values()) if self.loader else []

    # -- generation ------------------------------------------------------------------

    async def _prepare(
        self, version_ref: str, prompt: str, params: common_pb2.SamplingParams
    ) -> GenerationRequest:
        self._require_loader()
        sampling = sampling_from_proto(
            params,
            default_max_tokens=self._default_max_tokens,
            max_new_tokens_limit=self._max_new_tokens_limit,
        )
        if not prompt:
            raise InvalidArgument("prompt is empty")
        limit = min(self._max_prompt_tokens, self.backend.context_length - 1)
        # No tokenizer packs 64 characters into one token: a prompt this long cannot fit,
        # so refuse it without paying to tokenize megabytes.
        if len(prompt) > limit * 64:
            raise InvalidArgument(
                f"prompt has {len(prompt)} characters, far above the limit of {limit} tokens"
            )
        n_tokens = await self.backend.count_prompt_tokens(prompt)
        if n_tokens > limit:
            raise InvalidArgument(
                f"prompt has {n_tokens} tokens; this server accepts at most {limit}"
            )
        adapter: str | None = None
        if version_ref not in BASE_REFS:
            adapter = (await self.load(version_ref)).record.version_id
        return GenerationRequest(prompt=prompt, sampling=sampling, adapter=adapter)

    async def generate(
        self, version_ref: str, prompt: str, params: common_pb2.SamplingParams
    ) -> tuple[str, Completion]:
        parts: list[str] = []
        served, last = "", None
        async with contextlib.aclosing(self.stream(version_ref, prompt, params)) as chunks:
            async for served, chunk in chunks:  # noqa: B007 - the version is the same in each
                parts.append(chunk.text)
                last = chunk
        assert last is not None
        assert last.finish_reason is not None
        completion = Completion(
            "".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason
        )
        return served, completion

    async def stream(
        self, version_ref: str, prompt: str, params: common_pb2.SamplingParams
    ) -> AsyncGenerator[tuple[str, Chunk], None]:
        with self._admit():
            started = time.perf_counter()
            request = await self._prepare(version_ref, prompt, params)
            version = request.adapter or ""
            ttft: float | None = None
            last: Chunk | None = None
            outcome = "error"
            try:
                self.faults.before_first_token(version)
                chunks = self.backend.stream(request)
                async with contextlib.aclosing(self.faults.slowed(version, chunks)) as slowed:
                    async for chunk in slowed:
                        if ttft is None and (chunk.text or chunk.completion_tokens):
                            ttft = time.perf_counter() - started
                        last = chunk
                        yield version, chunk
                outcome = "ok"
            except (GeneratorExit, asyncio.CancelledError):
                outcome = "cancelled"  # the client went away
                raise
            finally:
                self.metrics.request_done(
                    version,
                    outcome=outcome,
                    prompt_tokens=last.prompt_tokens if last else 0,
                    completion_tokens=last.completion_tokens if last else 0,
                    ttft_s=ttft,
                    latency_s=time.perf_counter() - started,
                )
