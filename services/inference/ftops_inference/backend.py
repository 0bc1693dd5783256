"""The backend interface. The service talks to a ``Backend``: ``HFPeftBackend``
(transformers + PEFT, mixed-adapter continuous batching, bounded residency),
``EchoBackend`` (no model, for gateway benchmarks) and ``VLLMBackend`` (GPU). Everything is
async, adapters are addressed by version id, and each request names its adapter."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ftops_inference.sampling import FinishReason, SamplingConfig


@dataclass(frozen=True)
class ModuleShape:
    """What a LoRA pair attached to a base module must fit: (in, out) features."""

    kind: str  # "linear" or "embedding"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    sampling: SamplingConfig
    # Adapter version id; None means the base model alone.
    adapter: str | None = None


@dataclass(frozen=True)
class Chunk:
    """Text added since the previous chunk. The last chunk carries ``finish_reason``."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class AdapterStats:
    tier: str = ""  # "model", "cpu", "disk" or "" (not held)
    loads: int = 0
    reloads: int = 0
    evictions: int = 0


class Backend(Protocol):
    """A base model plus adapters loaded side by side under their version ids."""

    @property
    def ready(self) -> bool: ...

    @property
    def context_length(self) -> int: ...

    async def start(self) -> None:
        """Load the base model (slow; the server answers NOT_SERVING meanwhile)."""

    async def close(self) -> None: ...

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        """Base modules an adapter may target, by name as in the base model."""
        ...

    async def count_prompt_tokens(self, prompt: str) -> int: ...

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        """Make a verified version servable and bring it into the model (it is about to
        get traffic). Loading a version the backend holds already changes nothing."""

    async def unload_adapter(self, version_id: str) -> None:
        """Forget a version entirely, once no in-flight request uses it."""

    def loaded(self) -> list[str]:
        """Versions in the model now (served without a load)."""
        ...

    def cached(self) -> list[str]:
        """Versions outside the model but in a fast tier (CPU); served after a reload."""
        ...

    def holds(self, version_id: str) -> bool:
        """Whether the version is servable here, whatever its tier."""
        ...

    def adapter_stats(self, version_id: str) -> AdapterStats: ...

    def watch(self, on_change: Callable[[], None], on_event: Callable[[str, str], None]) -> None:
        """``on_change()`` when the loaded/cached sets change; ``on_event(version, what)``
        for each load, reload, evict and unload (metrics)."""

    @property
    def failure(self) -> str | None:
        """Why the backend is not serving after a crash, until it recovers; else None."""
        ...

    @property
    def kind(self) -> str:
        """ "hf", "vllm" or "echo" (announced to gateways)."""
        ...

    async def generate(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Deltas as they are produced; closing the iterator cancels the generation."""
        ...


async def complete(chunks: AsyncGenerator[Chunk, None]) -> Completion:
    """Collect a stream into one completion (closing the stream if the caller goes away)."""
    parts: list[str] = []
    last: Chunk | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
    if last is None or last.finish_reason is None:
        raise RuntimeError("the backend ended a generation without a finish reason")
    return Completion(
        "".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason
    )
