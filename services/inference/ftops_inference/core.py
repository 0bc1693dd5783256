"""The inference service without gRPC: request validation, admission control, on-demand
adapter loads, generation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from ftops.common.v1 import common_pb2
from ftops_inference.backend import Backend, Chunk, Completion, GenerationRequest
from ftops_inference.loader import AdapterLoader, AdapterRecord, LoadResult
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
    ) -> None:
        self.backend = backend
        self.loader: AdapterLoader | None = None  # set once the base model is known
        self.on_loaded: LoadedHook | None = None
        self._max_prompt_tokens = max_prompt_tokens
        self._max_new_tokens_limit = max_new_tokens_limit
        self._default_max_tokens = default_max_tokens
        self._max_concurrent = max_concurrent_requests
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _require_loader(self) -> AdapterLoader:
        if self.loader is None or not self.backend.ready:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.loader

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        # Counted from admission to the last token, queued requests included, so a
        # burst is refused at once instead of timing out in a queue.
        if self._in_flight >= self._max_concurrent:
            raise ResourceExhausted(
                f"{self._in_flight} requests in flight, the limit is {self._max_concurrent}; "
                "retry later"
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    # -- adapters --------------------------------------------------------------------

    async def load(self, ref: str, *, announce: bool = True) -> LoadResult:
        result = await self._require_loader().ensure_loaded(ref)
        if result.newly_loaded and announce and self.on_loaded is not None:
            try:
                await self.on_loaded(result.record)
            except Exception as exc:  # announcing is best effort; the load stands
                log.warning("could not announce %s: %r", result.record.version_id, exc)
        return result

    async def unload(self, ref: str) -> AdapterRecord:
        return await self._require_loader().unload(ref)

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
        with self._admit():
            request = await self._prepare(version_ref, prompt, params)
            completion = await self.backend.generate(request)
            return request.adapter or "", completion

    async def stream(
        self, version_ref: str, prompt: str, params: common_pb2.SamplingParams
    ) -> AsyncIterator[tuple[str, Chunk]]:
        with self._admit():
            request = await self._prepare(version_ref, prompt, params)
            async with contextlib.aclosing(self.backend.stream(request)) as chunks:
                async for chunk in chunks:
                    yield request.adapter or "", chunk
