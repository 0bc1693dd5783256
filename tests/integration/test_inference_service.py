"""The inference service over real gRPC and NATS, with the tiny model and a fake registry:
adapter.ready -> verified hot load -> adapter.loaded -> generation with that adapter."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import torch
from nats.aio.msg import Msg

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_inference.backend import GenerationRequest
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import SamplingConfig
from ftops_inference.service import InferenceService
from ftops_inference.settings import InferenceSettings
from ftops_runtime import events, hashing
from ftops_runtime.client import channel

pytestmark = pytest.mark.integration

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = "The capital of"
SEEDED = common_pb2.SamplingParams(max_tokens=24, temperature=0.9, top_k=40, seed=5)
GREEDY = common_pb2.SamplingParams(max_tokens=24)


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
    return out


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Versions and artifacts in memory, served per the registry contract."""

    def __init__(self) -> None:
        self.base_models: dict[str, registry_pb2.BaseModel] = {}
        self.versions: dict[str, registry_pb2.Version] = {}
        self.blobs: dict[str, list[tuple[common_pb2.ArtifactFile, bytes]]] = {}
        self.downloads = 0
        self.downloaded: list[str] = []

    def add_version(
        self,
        adapter_dir: Path,
        fingerprint: str,
        *,
        adapter: str = "bot",
        corrupt: bool = False,
        names: dict[str, str] | None = None,
    ) -> registry_pb2.Version:
        """``names`` lists files under other names than their own (a hostile upload)."""
        files = []
        for name in ADAPTER_FILES:
            data = (adapter_dir / name).read_bytes()
            declared = common_pb2.ArtifactFile(
                path=(names or {}).get(name, name),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )
            if corrupt and name.endswith(".safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, other content
            files.append((declared, data))
        artifact_id = hashing.manifest_id([(f.path, f.sha256, f.size_bytes) for f, _ in files])
        artifact_id = f"{artifact_id[:40]}{'bad' if corrupt else ''}"
        self.blobs[artifact_id] = files
        number = len(self.versions) + 1
        version = registry_pb2.Version(
            version_id=f"ver_{uuid.uuid4().hex[:12]}",
            adapter=adapter,
            number=number,
            base_model="tiny-llama",
            base_model_fingerprint=fingerprint,
            artifact_id=artifact_id,
            files=[f for f, _ in files],
        )
        self.versions[version.version_id] = version
        return version

    async def RegisterBaseModel(self, request: Any, context: Any) -> registry_pb2.BaseModel:
        model = registry_pb2.BaseModel(
            name=request.name, fingerprint=request.fingerprint, uri=request.uri
        )
        self.base_models[request.name] = model
        return model

    async def GetVersion(self, request: Any, context: Any) -> registry_pb2.Version:
        for version in self.versions.values():
            name = f"{version.adapter}:{version.number}"
            if request.version_id == version.version_id or request.name == name:
                return version
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such version")
        raise AssertionError

    def downloads_of(self, artifact_id: str) -> int:
        return self.downloaded.count(artifact_id)

    async def DownloadArtifact(
        self, request: Any, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        self.downloads += 1
        self.downloaded.append(request.artifact_id)
        files = self.blobs.get(request.artifact_id)
        if files is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
            return
        yield registry_pb2.DownloadArtifactResponse(
            manifest=registry_pb2.Artifact(
                artifact_id=request.artifact_id, files=[f for f, _ in files]
            )
        )
        for index, (_, data) in enumerate(files):
            for start in range(0, len(data), 16 * 1024):
                yield registry_pb2.DownloadArtifactResponse(
                    chunk=registry_pb2.FileChunk(file_index=index, data=data[start : start + 16384])
                )


@dataclass
class Stack:
    service: InferenceService
    registry: FakeRegistry
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    events: dict[str, asyncio.Queue[Any]]
    nc: Any
    fingerprint: str
    adapters: list[Path]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
async def stack(
    nats_url: str,
    tiny_model_dir: Path,
    adapter_dirs: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    registry = FakeRegistry()  # type: ignore[abstract]
    registry_server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, registry_server)
    registry_port = registry_server.add_insecure_port("127.0.0.1:0")
    await registry_server.start()

    settings = InferenceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        nats_url=nats_url,
        instance_id=f"inftest-{uuid.uuid4().hex[:6]}",
        base_model_path=str(tiny_model_dir),
        registry_address=f"127.0.0.1:{registry_port}",
        adapter_cache_dir=str(tmp_path_factory.mktemp("cache")),
        health_interval_s=0.2,
        max_prompt_tokens=200,
        auth_mode="disabled",  # access control has its own tests
    )
    service = InferenceService(settings)
    nc = await nats.connect(nats_url)
    chan = channel("127.0.0.1:1")
    try:
        await service.start()
        await asyncio.wait_for(service.wait_ready(), 60)
        queues: dict[str, asyncio.Queue[Any]] = {}
        for subject in (events.ADAPTER_LOADED, events.ADAPTER_LOAD_FAILED):
            queue: asyncio.Queue[Any] = asyncio.Queue()
            queues[subject] = queue
            payload_type = events.PAYLOAD_TYPES[subject]

            async def on_msg(
                msg: Msg, q: asyncio.Queue[Any] = queue, t: Any = payload_type
            ) -> None:
                event = t.FromString(msg.data)
                # Only this replica's reports: other replicas may share the NATS server.
                if event.replica_id == settings.instance_id:
                    q.put_nowait(event)

            await nc.subscribe(subject, cb=on_msg)
        # adapter.ready is consumed from NEW messages on: wait until the consumer exists.
        js = nc.jetstream()
        durable = f"inference-{settings.instance_id}"
        for _ in range(100):
            try:
                await js.consumer_info("FTOPS_ADAPTER", durable)
                break
            except Exception:
                await asyncio.sleep(0.1)
        await chan.close()
        chan = channel(service.address)
        stub = inference_pb2_grpc.InferenceServiceStub(chan)
        yield Stack(service, registry, stub, queues, nc, service.base_fingerprint, adapter_dirs)  # type: ignore[arg-type]
    finally:
        await chan.close()
        await nc.close()
        await service.stop()
        await registry_server.stop(None)


async def publish_ready(
    stack: Stack, version: registry_pb2.Version, *, fingerprint: str = ""
) -> None:
    event = events_pb2.AdapterReady(
        meta=events.new_meta("test", "test"),
        version_id=version.version_id,
        adapter=version.adapter,
        version_number=version.number,
        base_model="tiny-llama",
        base_model_fingerprint=fingerprint or version.base_model_fingerprint,
        files=version.files,
    )
    await stack.nc.jetstream().publish(events.ADAPTER_READY, event.SerializeToString())


async def next_event(stack: Stack, subject: str, version_id: str, timeout: float = 30) -> Any:
    async def wait() -> Any:
        while True:
            event = await stack.events[subject].get()
            if event.version_id == version_id:
                return event

    return await asyncio.wait_for(wait(), timeout)


async def generate(
    stack: Stack, version_id: str, params: common_pb2.SamplingParams = GREEDY, prompt: str = PROMPT
) -> inference_pb2.GenerateResponse:
    request = inference_pb2.GenerateRequest(
        request_id="r1", version_id=version_id, prompt=prompt, sampling=params
    )
    reply: inference_pb2.GenerateResponse = await stack.stub.Generate(request, timeout=30)
    return reply


async def test_base_model_is_registered_and_serving(stack: Stack, tiny_model_dir: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    model = stack.registry.base_models["tiny-llama"]
    assert model.fingerprint == hashing.model_fingerprint(tiny_model_dir)
    assert model.uri == str(stack.service.model_dir)
    assert stack.service.model_dir.is_absolute()
    health = health_pb2_grpc.HealthStub(channel(stack.service.address))
    for _ in range(50):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_adapter_ready_loads_and_serves_that_adapter(
    stack: Stack, tiny_model_dir: Path
) -> None:
    version = stack.registry.add_version(stack.adapters[0], stack.fingerprint)
    await publish_ready(stack, version)
    loaded = await next_event(stack, events.ADAPTER_LOADED, version.version_id)
    assert loaded.endpoint == stack.service.endpoint
    assert loaded.replica_id == stack.service.settings.instance_id
    assert loaded.load_seconds > 0

    with_adapter = await generate(stack, version.version_id, SEEDED)
    base = await generate(stack, "", SEEDED)
    assert with_adapter.version_id == version.version_id
    assert with_adapter.text != base.text

    # Same seed, same adapter, a fresh backend: the same text.
    fresh = HFPeftBackend(tiny_model_dir)
    await fresh.start()
    await fresh.load_adapter("x", stack.adapters[0])
    cfg = SamplingConfig(max_tokens=24, temperature=0.9, top_k=40, seed=5)
    expected = await fresh.generate(GenerationRequest(PROMPT, cfg, "x"))
    await fresh.close()
    assert with_adapter.text == expected.text
    assert with_adapter.completion_tokens == expected.completion_tokens

    # A repeated event re-announces without reloading.
    downloads = stack.registry.downloads
    await publish_ready(stack, version)
    again = await next_event(stack, events.ADAPTER_LOADED, version.version_id)
    assert again.load_seconds == loaded.load_seconds
    assert stack.registry.downloads == downloads

    listed = await stack.stub.ListAdapters(inference_pb2.ListAdaptersRequest())
    assert listed.base_model_fingerprint == stack.fingerprint
    states = {a.version_id: a.state for a in listed.adapters}
    assert states[version.version_id] == inference_pb2.ADAPTER_STATE_LOADED


async def test_corrupted_artifact_is_refused_and_others_keep_serving(stack: Stack) -> None:
    good = stack.registry.add_version(stack.adapters[0], stack.fingerprint)
    await stack.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(version_id=good.version_id))
    before = await generate(stack, good.version_id)

    bad = stack.registry.add_version(stack.adapters[1], stack.fingerprint, corrupt=True)
    await publish_ready(stack, bad)
    failed = await next_event(stack, events.ADAPTER_LOAD_FAILED, bad.version_id)
    assert "sha256 mismatch for adapter_model.safetensors" in failed.reason

    after = await generate(stack, good.version_id)
    assert after.text == before.text
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, bad.version_id)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    # Nothing of the refused version is left in the cache.
    cache = Path(stack.service.settings.adapter_cache_dir)
    names = await asyncio.to_thread(os.listdir, cache)
    assert not any(bad.version_id in name for name in names)


async def test_ready_for_another_base_is_ignored(stack: Stack) -> None:
    version = stack.registry.add_version(stack.adapters[1], "f" * 64)
    await publish_ready(stack, version)
    # A later event for our base is answered, so the first one was handled (ignored) by then.
    ours = stack.registry.add_version(stack.adapters[1], stack.fingerprint)
    await publish_ready(stack, ours)
    await next_event(stack, events.ADAPTER_LOADED, ours.version_id)
    for subject in (events.ADAPTER_LOADED, events.ADAPTER_LOAD_FAILED):
        seen = [stack.events[subject].get_nowait() for _ in range(stack.events[subject].qsize())]
        assert version.version_id not in {e.version_id for e in seen}


async def test_version_is_loaded_on_demand_by_name(stack: Stack) -> None:
    version = stack.registry.add_version(stack.adapters[1], stack.fingerprint, adapter="demand")
    reply = await generate(stack, f"demand:{version.number}")
    assert reply.version_id == version.version_id
    assert reply.completion_tokens > 0
    assert reply.finish_reason in (common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_LENGTH)


async def test_rejected_version_is_never_loaded(stack: Stack) -> None:
    version = stack.registry.add_version(stack.adapters[1], stack.fingerprint, adapter="gated")
    version.state = "rejected"
    version.evaluation.reasons.append("retention 0.40 < 0.95")
    downloads = stack.registry.downloads_of(version.artifact_id)  # shared by other tests
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, version.version_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "retention 0.40 < 0.95" in (info.value.details() or "")
    assert stack.registry.downloads_of(version.artifact_id) == downloads


async def test_stream_concatenates_to_generate(stack: Stack) -> None:
    version = stack.registry.add_version(stack.adapters[1], stack.fingerprint)
    full = await generate(stack, version.version_id)
    request = inference_pb2.GenerateRequest(
        request_id="s1", version_id=version.version_id, prompt=PROMPT, sampling=GREEDY
    )
    chunks = [c async for c in stack.stub.GenerateStream(request, timeout=30)]
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert chunks[-1].completion_tokens == full.completion_tokens
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


async def test_unknown_version_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, "ver_doesnotexist")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ver_doesnotexist" in (info.value.details() or "")


async def test_too_long_prompt_is_invalid_argument(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, "", prompt="word " * 400)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this server accepts at most 200" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, "", common_pb2.SamplingParams(max_tokens=100_000))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancelled_stream_frees_its_slot(stack: Stack) -> None:
    request = inference_pb2.GenerateRequest(
        version_id="",
        prompt=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=200, temperature=1.0),
    )
    call = stack.stub.GenerateStream(request, timeout=30)
    async for _ in call:
        break
    call.cancel()
    for _ in range(100):
        if stack.service.core.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert stack.service.core.in_flight == 0


async def test_unload_then_generate_loads_again(stack: Stack) -> None:
    version = stack.registry.add_version(stack.adapters[0], stack.fingerprint)
    first = await generate(stack, version.version_id)
    status = await stack.stub.UnloadAdapter(
        inference_pb2.UnloadAdapterRequest(version_id=version.version_id)
    )
    assert status.state == inference_pb2.ADAPTER_STATE_UNLOADED
    again = await generate(stack, version.version_id)
    assert again.text == first.text


def hostile_copy(adapter_dir: Path, out: Path, key: str, poison: Any) -> Path:
    """A copy of a real adapter with one tensor poisoned."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter_dir / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors[key] = poison(tensors[key].clone())
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _one_nan(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[7] = float("nan")
    return t


async def test_hostile_adapters_are_refused_naming_what_is_wrong(
    stack: Stack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The issue's hostile copies of a real adapter loaded (adapter.loaded, no warning) and
    answered nonsense: NaN, +Inf, one NaN, ~3e38, a consistent rank-512 adapter (above the
    default max_lora_rank), and weights under another file name (which failed with the
    cache's path in the message). Each is adapter.load_failed naming the tensor or file,
    with no server path, and a good adapter keeps serving throughout."""
    from safetensors.torch import load_file

    good = stack.registry.add_version(stack.adapters[0], stack.fingerprint)
    await stack.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(version_id=good.version_id))
    before = await generate(stack, good.version_id)

    keys = sorted(load_file(str(stack.adapters[0] / "adapter_model.safetensors")))
    key = next(k for k in keys if k.endswith("v_proj.lora_B.weight"))
    cases: list[tuple[Path, dict[str, str] | None, str]] = [
        (
            hostile_copy(stack.adapters[0], tmp_path / "nan", key, lambda t: t.fill_(float("nan"))),
            None,
            f"{key}' holds non-finite",
        ),
        (
            hostile_copy(stack.adapters[0], tmp_path / "inf", key, lambda t: t.fill_(float("inf"))),
            None,
            f"{key}' holds non-finite",
        ),
        (
            hostile_copy(stack.adapters[0], tmp_path / "one", key, _one_nan),
            None,
            f"{key}' holds non-finite",
        ),
        (
            hostile_copy(stack.adapters[0], tmp_path / "huge", key, lambda t: t.fill_(3e38)),
            None,
            f"{key}' holds values up to 3e+38",
        ),
        (make_adapter(tiny_model_dir, tmp_path / "rank", 3, rank=512), None, "rank 512"),
        (
            stack.adapters[1],
            {"adapter_model.safetensors": "weights.safetensors"},
            "'weights.safetensors' refused",
        ),
    ]
    cache = stack.service.settings.adapter_cache_dir
    for adapter_dir, names, reason in cases:
        bad = stack.registry.add_version(adapter_dir, stack.fingerprint, names=names)
        await publish_ready(stack, bad)
        failed = await next_event(stack, events.ADAPTER_LOAD_FAILED, bad.version_id)
        assert reason in failed.reason
        assert cache not in failed.reason
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(stack, bad.version_id)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason in (info.value.details() or "")

    after = await generate(stack, good.version_id)
    assert after.text == before.text


async def test_a_chat_is_answered_as_its_rendered_prompt(stack: Stack) -> None:
    chat = [("system", "Answer briefly."), ("user", "The capital of")]
    messages = [inference_pb2.ChatMessage(role=r, content=c) for r, c in chat]
    as_chat = await stack.stub.Generate(
        inference_pb2.GenerateRequest(request_id="c1", messages=messages, sampling=GREEDY),
        timeout=30,
    )
    as_prompt = await generate(stack, "", prompt=stack.service.core.chat.render(chat))
    assert as_chat.prompt_tokens == as_prompt.prompt_tokens > 0
    assert as_chat.text == as_prompt.text
    stream = stack.stub.GenerateStream(
        inference_pb2.GenerateRequest(request_id="c2", messages=messages, sampling=GREEDY),
        timeout=30,
    )
    assert "".join([c.text async for c in stream]) == as_chat.text


async def test_a_chat_to_a_model_without_a_chat_template_is_invalid_argument(
    stack: Stack,
) -> None:
    from ftops_inference.chat import ChatRenderer

    renderer = stack.service.core.chat
    # What a base model directory without a chat template loads (see test_inference_chat).
    stack.service.core.chat = ChatRenderer(None, "tiny-llama")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.Generate(
                inference_pb2.GenerateRequest(
                    messages=[inference_pb2.ChatMessage(role="user", content="hi")]
                ),
                timeout=30,
            )
    finally:
        stack.service.core.chat = renderer
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "base model 'tiny-llama' has no chat template" in (info.value.details() or "")
