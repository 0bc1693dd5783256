"""Request validation and admission control of the core, over a fake backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ftops.common.v1 import common_pb2
from ftops_inference.backend import (
    AdapterStats,
    Chunk,
    Completion,
    GenerationRequest,
    ModuleShape,
    complete,
)
from ftops_inference.chat import ChatRenderer
from ftops_inference.core import InferenceCore
from ftops_inference.loader import AdapterLoader
from ftops_inference.sampling import FinishReason
from ftops_runtime.errors import Internal, InvalidArgument, ResourceExhausted, Unavailable


class FakeBackend:
    """Counts a token per whitespace-separated word; generation waits on ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: list[GenerationRequest] = []

    ready = True
    context_length = 100

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        return {}

    async def count_prompt_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None: ...

    async def unload_adapter(self, version_id: str) -> None: ...

    def loaded(self) -> list[str]:
        return []

    def cached(self) -> list[str]:
        return []

    def holds(self, version_id: str) -> bool:
        return False

    def adapter_stats(self, version_id: str) -> AdapterStats:
        return AdapterStats()

    def watch(self, on_change: Callable[[], None], on_event: Callable[[str, str], None]) -> None:
        pass

    failure: str | None = None
    kind = "fake"

    async def generate(self, request: GenerationRequest) -> Completion:
        return await complete(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        self.requests.append(request)
        await self.gate.wait()
        yield Chunk("ok", 1, 1, FinishReason.EOS)


def make_core(backend: FakeBackend, *, loader: bool = True, **limits: int) -> InferenceCore:
    core = InferenceCore(
        backend,
        max_prompt_tokens=limits.get("max_prompt_tokens", 10),
        max_new_tokens_limit=limits.get("max_new_tokens_limit", 20),
        default_max_tokens=8,
        max_concurrent_requests=limits.get("max_concurrent_requests", 2),
        max_queue_length=limits.get("max_queue_length", 0),
        max_queue_wait_s=10.0,
    )
    if loader:
        core.loader = AdapterLoader(
            registry=None,  # type: ignore[arg-type]
            backend=backend,
            cache_dir=Path("/nonexistent"),
            base_fingerprint="fp",
        )
    return core


async def test_base_request_passes_validated_sampling() -> None:
    backend = FakeBackend()
    core = make_core(backend)
    version, done = await core.generate("base", "a b c", common_pb2.SamplingParams(max_tokens=5))
    assert version == ""
    assert done.text == "ok"
    assert backend.requests[0].adapter is None
    assert backend.requests[0].sampling.max_tokens == 5


async def test_prompt_too_long_is_invalid() -> None:
    core = make_core(FakeBackend())
    with pytest.raises(
        InvalidArgument, match="prompt has 11 tokens; this server accepts at most 10"
    ):
        await core.generate("", " ".join(["w"] * 11), common_pb2.SamplingParams())


async def test_prompt_limit_respects_the_model_context() -> None:
    core = make_core(FakeBackend(), max_prompt_tokens=1000)
    with pytest.raises(InvalidArgument, match="at most 99"):
        await core.generate("", " ".join(["w"] * 100), common_pb2.SamplingParams())


async def test_max_tokens_too_large_is_invalid() -> None:
    core = make_core(FakeBackend())
    with pytest.raises(InvalidArgument, match="max_tokens=21 exceeds"):
        await core.generate("", "hi", common_pb2.SamplingParams(max_tokens=21))


async def test_empty_prompt_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        await make_core(FakeBackend()).generate("", "", common_pb2.SamplingParams())


async def test_not_ready_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="still loading"):
        await make_core(FakeBackend(), loader=False).generate("", "hi", common_pb2.SamplingParams())


async def test_requests_beyond_the_slots_wait_their_turn_within_the_queue() -> None:
    backend = FakeBackend()
    backend.gate.clear()
    core = make_core(backend, max_concurrent_requests=2, max_queue_length=1)
    params = common_pb2.SamplingParams()
    held = [asyncio.create_task(core.generate("", "hi", params)) for _ in range(3)]
    while len(backend.requests) < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert (core.admission.running, core.admission.waiting, core.in_flight) == (2, 1, 3)
    with pytest.raises(ResourceExhausted, match=r"the limit is 2\) and 1 waiting") as info:
        await core.generate("", "hi", params)
    assert info.value.retry_after_ms > 0
    # A bad request is refused before it could wait for a slot.
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        await core.generate("", "", params)
    backend.gate.set()
    await asyncio.gather(*held)
    assert len(backend.requests) == 3  # the queued one was served
    assert core.in_flight == 0
    assert core.admission.service_time_s is not None


async def test_a_best_effort_request_is_dropped_for_a_user_request() -> None:
    backend = FakeBackend()
    backend.gate.clear()
    core = make_core(backend, max_concurrent_requests=1, max_queue_length=4)
    params = common_pb2.SamplingParams()
    mirror = asyncio.create_task(core.generate("", "mirror", params, best_effort=True))
    while len(backend.requests) < 1:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    user = asyncio.create_task(core.generate("", "user", params))
    with pytest.raises(ResourceExhausted, match="best-effort request dropped") as info:
        await mirror
    assert info.value.retry_after_ms > 0
    backend.gate.set()
    assert (await user)[1].text == "ok"
    assert [r.prompt for r in backend.requests] == ["mirror", "user"]
    assert core.in_flight == 0
    # The replica's choice, not the version's error.
    assert core.metrics.by_version[""].errors == 0


def otel_points(reader: Any) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


async def test_metrics_per_version_and_outcome_reach_opentelemetry() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from ftops_inference.faults import Faults
    from ftops_inference.metrics import ServingMetrics

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    backend = FakeBackend()
    core = InferenceCore(
        backend,
        max_prompt_tokens=10,
        max_new_tokens_limit=20,
        default_max_tokens=8,
        max_concurrent_requests=4,
        faults=Faults(error_rate=1.0, versions=frozenset({"broken"})),
        metrics=ServingMetrics(meter=meter),
    )
    core.loader = AdapterLoader(
        registry=None,  # type: ignore[arg-type]
        backend=backend,
        cache_dir=Path("/nonexistent"),
        base_fingerprint="fp",
    )
    params = common_pb2.SamplingParams()
    await core.generate("", "a b", params)
    await core.generate("", "a b c", params)
    core.faults.versions = frozenset({""})  # now the base misbehaves
    with pytest.raises(Internal, match="injected fault"):
        await core.generate("", "a", params)
    core.metrics.adapter_event("v1", "reload")

    points = otel_points(reader)
    requests = {
        (p.attributes["version"], p.attributes["outcome"]): p.value
        for p in points["ftops.inference.requests"]
    }
    assert requests == {("base", "ok"): 2, ("base", "error"): 1}
    tokens = {p.attributes["kind"]: p.value for p in points["ftops.inference.tokens"]}
    assert tokens == {"prompt": 2, "completion": 2}  # the fake answers 1+1 per request
    assert sum(p.count for p in points["ftops.inference.ttft"]) == 2
    assert sum(p.count for p in points["ftops.inference.latency"]) == 3
    events = {
        (p.attributes["version"], p.attributes["event"]): p.value
        for p in points["ftops.inference.adapter_events"]
    }
    assert events == {("v1", "reload"): 1}
    assert core.metrics.by_version[""].requests == 3
    assert core.metrics.by_version[""].errors == 1


CHAT_TURNS = [("system", "Be brief."), ("user", "How much is the Zorblax plan?")]


async def test_the_core_generates_from_the_rendered_chat(tiny_model_dir: Path) -> None:
    backend = FakeBackend()
    core = make_core(backend, max_prompt_tokens=90)
    core.chat = ChatRenderer.load(tiny_model_dir, "tiny-llama")
    await core.generate("", "", common_pb2.SamplingParams(), messages=CHAT_TURNS)
    assert backend.requests[-1].prompt == core.chat.render(CHAT_TURNS)
    with pytest.raises(InvalidArgument, match="set prompt or messages, not both"):
        await core.generate("", "hello", common_pb2.SamplingParams(), messages=CHAT_TURNS)


async def test_the_core_refuses_chats_before_it_knows_a_template() -> None:
    backend = FakeBackend()
    core = make_core(backend)
    with pytest.raises(InvalidArgument, match="chat template"):
        await core.generate("", "", common_pb2.SamplingParams(), messages=CHAT_TURNS)
    assert backend.requests == []
