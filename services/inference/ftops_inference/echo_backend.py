"""A backend without a model: each request gets its prompt's words back, one token per
word, after an optional per-token delay. For measuring the gateway's own overhead and for
tests of everything around the model; adapters are bookkept but change nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path

from ftops_inference.backend import (
    AdapterStats,
    Chunk,
    Completion,
    GenerationRequest,
    ModuleShape,
    complete,
)
from ftops_inference.base_files import read_base
from ftops_inference.sampling import FinishReason, TextTracker
from ftops_runtime.errors import FailedPrecondition, NotFound


class EchoBackend:
    kind = "echo"

    def __init__(self, model_dir: Path, *, token_delay_s: float = 0.0) -> None:
        self.model_dir = model_dir
        self._delay = token_delay_s
        self._shapes: dict[str, ModuleShape] = {}
        self._context = 0
        self._adapters: dict[str, Path] = {}
        self._stats: dict[str, AdapterStats] = {}
        self._ready = False
        self._on_change: Callable[[], None] = lambda: None
        self._on_event: Callable[[str, str], None] = lambda version, event: None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failure(self) -> str | None:
        return None

    @property
    def context_length(self) -> int:
        return self._context

    async def start(self) -> None:
        self._shapes, self._context = await asyncio.to_thread(read_base, self.model_dir)
        self._ready = True

    async def close(self) -> None:
        self._ready = False

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        return self._shapes

    def watch(self, on_change: Callable[[], None], on_event: Callable[[str, str], None]) -> None:
        self._on_change, self._on_event = on_change, on_event

    async def count_prompt_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        if version_id in self._adapters:
            return
        self._adapters[version_id] = adapter_dir
        self._stats[version_id] = AdapterStats("model", loads=1)
        self._on_event(version_id, "load")
        self._on_change()

    async def unload_adapter(self, version_id: str) -> None:
        if self._adapters.pop(version_id, None) is None:
            raise NotFound(f"adapter version {version_id} is not loaded")
        self._stats.pop(version_id, None)
        self._on_event(version_id, "unload")
        self._on_change()

    def loaded(self) -> list[str]:
        return list(self._adapters)

    def cached(self) -> list[str]:
        return []

    def holds(self, version_id: str) -> bool:
        return version_id in self._adapters

    def adapter_stats(self, version_id: str) -> AdapterStats:
        return self._stats.get(version_id, AdapterStats())

    async def generate(self, request: GenerationRequest) -> Completion:
        return await complete(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise FailedPrecondition(f"adapter version {request.adapter} was unloaded meanwhile")
        words = request.prompt.split()
        n_prompt = len(words)
        tracker = TextTracker(request.sampling.stop)
        out: list[str] = []
        finish = FinishReason.EOS
        for word in words:
            if len(out) >= request.sampling.max_tokens:
                finish = FinishReason.LENGTH
                break
            if self._delay:
                await asyncio.sleep(self._delay)
            out.append(word)
            delta = tracker.update(" ".join(out))
            if tracker.stopped:
                yield Chunk(delta + tracker.finish(), len(out), n_prompt, FinishReason.STOP)
                return
            if delta:
                yield Chunk(delta, len(out), n_prompt)
        yield Chunk(tracker.finish(), len(out), n_prompt, finish)
