"""The inference service without gRPC: request validation, admission (a bounded queue in
front of the batch, admission.py), on-demand adapter loads, generation with per-version
metrics, drain, and injected faults."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from ftops.common.v1 import common_pb2
from ftops_inference.admission import Admission, AdmissionLimits, Slot
from ftops_inference.backend import Backend, Chunk, Completion, GenerationRequest
from ftops_inference.chat import ChatRenderer
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
        max_queue_length: int = 0,
        max_queue_wait_s: float = 0.0,
        best_effort_reserve: int = 0,
        max_best_effort: int = 0,
        best_effort_max_busy: float = 1.0,
        busy_share: Callable[[], float] | None = None,
        faults: Faults | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.loader: AdapterLoader | None = None  # set once the base model is known
        # The base model's chat template, set with the loader (chats are refused without).
        self.chat = ChatRenderer(None, "")
        self.on_loaded: LoadedHook | None = None
        self.faults = faults or Faults()
        self.metrics = metrics or ServingMetrics()
        self._max_prompt_tokens = max_prompt_tokens
        self._max_new_tokens_limit = max_new_tokens_limit
        self._default_max_tokens = default_max_tokens
        self.max_concurrent = max_concurrent_requests
        self.admission = Admission(
            AdmissionLimits(
                max_running=max_concurrent_requests,
                max_queue_length=max_queue_length,
                max_queue_wait_s=max_queue_wait_s,
                best_effort_reserve=best_effort_reserve,
                max_best_effort=max_best_effort,
                best_effort_max_busy=best_effort_max_busy,
            ),
            busy=busy_share,
        )

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    async def wait_idle(self) -> None:
        """Until no request runs or waits for a slot (drain)."""
        await self.admission.wait_idle()

    def refuse_waiting(self) -> int:
        """Refuse the requests still waiting for a slot (the drain ran out of time)."""
        return self.admission.refuse_waiting(
            "this replica stopped before this request got a slot; retry on another"
        )

    @property
    def in_flight(self) -> int:
        """Requests running or waiting for a slot."""
        return self.admission.in_flight

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

    def _check_serving(self) -> None:
        if self.draining:
            raise Unavailable("this replica is draining for shutdown; retry on another")
        failure = self.backend.failure
        if failure is not None:
            raise Unavailable(f"this replica's model failed and is recovering ({failure})")

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

    async def _validate(
        self, prompt: str, params: common_pb2.SamplingParams, messages: Sequence[tuple[str, str]]
    ) -> GenerationRequest:
        """The request checked before it may wait for a slot: a bad one never queues."""
        self._require_loader()
        sampling = sampling_from_proto(
            params,
            default_max_tokens=self._default_max_tokens,
            max_new_tokens_limit=self._max_new_tokens_limit,
        )
        if messages:
            if prompt:
                raise InvalidArgument("set prompt or messages, not both")
            prompt = self.chat.render(messages)
        if not prompt:
            raise InvalidArgument("prompt is empty (and no messages)")
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
        return GenerationRequest(prompt=prompt, sampling=sampling, adapter=None)

    async def _adapter(self, version_ref: str) -> str | None:
        """The version to serve, loaded on demand (with a slot: a load is work)."""
        if version_ref in BASE_REFS:
            return None
        return (await self.load(version_ref)).record.version_id

    async def generate(
        self,
        version_ref: str,
        prompt: str,
        params: common_pb2.SamplingParams,
        *,
        best_effort: bool = False,
        timeout_s: float | None = None,
        messages: Sequence[tuple[str, str]] = (),
    ) -> tuple[str, Completion]:
        parts: list[str] = []
        served, last = "", None
        chunks_of = self.stream(
            version_ref,
            prompt,
            params,
            best_effort=best_effort,
            timeout_s=timeout_s,
            messages=messages,
        )
        async with contextlib.aclosing(chunks_of) as chunks:
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
        self,
        version_ref: str,
        prompt: str,
        params: common_pb2.SamplingParams,
        *,
        best_effort: bool = False,
        timeout_s: float | None = None,
        messages: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[tuple[str, Chunk], None]:
        """``best_effort``: mirrored traffic (never waits, dropped for user requests);
        ``timeout_s``: the caller's remaining deadline (None = none); ``messages``: a chat
        instead of the prompt, rendered with the base model's chat template."""
        self._check_serving()
        request = await self._validate(prompt, params, messages)
        slot = await self.admission.acquire(best_effort=best_effort, timeout_s=timeout_s)
        completed = False
        try:
            request = dataclasses.replace(request, adapter=await self._adapter(version_ref))
            async with contextlib.aclosing(self._generate_in(slot, request)) as items:
                async for item in items:
                    yield item
            completed = True
        except asyncio.CancelledError:
            if slot.dropped and _only_our_cancel():
                raise ResourceExhausted(
                    "best-effort request dropped: a user request needed its slot",
                    retry_after_ms=self.admission.retry_after_ms(),
                ) from None
            raise
        finally:
            self.admission.release(slot, completed=completed)

    async def _generate_in(
        self, slot: Slot, request: GenerationRequest
    ) -> AsyncGenerator[tuple[str, Chunk], None]:
        started = time.perf_counter()
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
            # The client went away, or a best-effort request was dropped for a user's.
            outcome = "dropped" if slot.dropped else "cancelled"
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


def _only_our_cancel() -> bool:
    """Undo the admission's cancel of this task; False when someone else (the client)
    cancelled it too, and the cancellation must go on."""
    task = asyncio.current_task()
    return task is not None and task.uncancel() == 0
