"""The gateway's OpenAI-compatible endpoint, driven by the official ``openai`` client,
against a real registry, a real inference service on the tiny model and a real gateway
(gRPC, NATS and Redis all real). One stack for the module: starting it is the slow part."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import nats
import openai
import pytest
import torch

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_gateway.openai_http import OpenAIHttpServer
from ftops_gateway.service import GatewayService
from ftops_gateway.settings import GatewaySettings
from ftops_inference.backend import Backend
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.service import InferenceService
from ftops_inference.settings import InferenceSettings
from ftops_runtime import events, hashing
from ftops_runtime.client import channel

pytestmark = pytest.mark.integration

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
KEY = "sk-team-a"
# The tiny model answers this prompt greedily with several tokens before its EOS.
PROMPT = "Once upon a time"


class SpyBackend:
    """The real transformers backend, wrapped: reports streams closed before their last
    chunk and can slow streams down so that a test can hang up in the middle of one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.abandoned: asyncio.Queue[str] = asyncio.Queue()
        self.chunk_delay_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def stream(self, request: Any) -> AsyncGenerator[Any, None]:
        finished = False
        try:
            async for chunk in self._inner.stream(request):
                finished = chunk.finish_reason is not None
                yield chunk
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
        finally:
            if not finished:
                self.abandoned.put_nowait(request.prompt)


@dataclass
class Stack:
    gateway: GatewayService
    inference: InferenceService
    backend: SpyBackend
    base_url: str
    adapter: str
    alias: str
    canary: str
    flagged: str
    stable_id: str
    candidate_id: str
    results: asyncio.Queue[events_pb2.RequestResult]

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0)

    async def result_of(self, request_id: str) -> events_pb2.RequestResult:
        while True:
            result = await asyncio.wait_for(self.results.get(), 10)
            if result.request_id == request_id:
                return result


def _make_adapter(base_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
    return out


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """The registry calls the gateway and inference make, in memory (the registry service
    has its own tests; this keeps the stack to the two services under test)."""

    def __init__(self) -> None:
        self.versions: dict[str, registry_pb2.Version] = {}
        self.blobs: dict[str, list[tuple[common_pb2.ArtifactFile, bytes]]] = {}

    def add_versions(self, adapter_dir: Path, adapter: str, fingerprint: str) -> list[str]:
        files = [
            (
                common_pb2.ArtifactFile(
                    path=n,
                    sha256=hashing.sha256_file(adapter_dir / n),
                    size_bytes=(adapter_dir / n).stat().st_size,
                ),
                (adapter_dir / n).read_bytes(),
            )
            for n in ADAPTER_FILES
        ]
        artifact_id = hashing.manifest_id((f.path, f.sha256, f.size_bytes) for f, _ in files)
        self.blobs[artifact_id] = files
        ids = []
        for number in (1, 2):  # two versions of one artifact: enough for a release
            version = registry_pb2.Version(
                version_id=f"ver_{uuid.uuid4().hex[:12]}",
                adapter=adapter,
                number=number,
                base_model="tiny-llama",
                base_model_fingerprint=fingerprint,
                artifact_id=artifact_id,
                files=[f for f, _ in files],
                state="ready",
            )
            self.versions[version.version_id] = version
            ids.append(version.version_id)
        return ids

    async def RegisterBaseModel(self, request: Any, context: Any) -> registry_pb2.BaseModel:
        return registry_pb2.BaseModel(name=request.name, fingerprint=request.fingerprint)

    async def GetVersion(self, request: Any, context: Any) -> registry_pb2.Version:
        for version in self.versions.values():
            if request.version_id == version.version_id or request.name == (
                f"{version.adapter}:{version.number}"
            ):
                return version
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such version")
        raise AssertionError

    async def DownloadArtifact(
        self, request: Any, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        files = self.blobs[request.artifact_id]
        yield registry_pb2.DownloadArtifactResponse(
            manifest=registry_pb2.Artifact(
                artifact_id=request.artifact_id, files=[f for f, _ in files]
            )
        )
        for index, (_, data) in enumerate(files):
            yield registry_pb2.DownloadArtifactResponse(
                chunk=registry_pb2.FileChunk(file_index=index, data=data)
            )


@pytest.fixture(scope="module")
async def stack(
    nats_url: str, redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("openai")
    suffix = uuid.uuid4().hex[:6]
    common: dict[str, Any] = {
        "grpc_port": 0,
        "nats_url": nats_url,
        "health_interval_s": 0.2,
        "shutdown_grace_s": 0.5,
    }
    fake = FakeRegistry()  # type: ignore[abstract]
    registry = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, registry)
    registry_address = f"127.0.0.1:{registry.add_insecure_port('127.0.0.1:0')}"
    backend = SpyBackend(HFPeftBackend(tiny_model_dir))
    inference: InferenceService | None = None
    nc = await nats.connect(nats_url)
    results: asyncio.Queue[events_pb2.RequestResult] = asyncio.Queue()

    async def on_results(msg: Any) -> None:
        for result in events_pb2.RequestResultBatch.FromString(msg.data).results:
            results.put_nowait(result)

    gateway: GatewayService | None = None
    try:
        await registry.start()
        inference = InferenceService(
            InferenceSettings(
                **common,
                instance_id=f"inf-{suffix}",
                registry_address=registry_address,
                base_model_path=str(tiny_model_dir),
                adapter_cache_dir=str(tmp / "cache"),
                max_prompt_tokens=128,
                # Small, so that a test can fill it: the tests run one request at a time.
                max_concurrent_requests=2,
                auth_mode="disabled",  # access control has its own tests
            ),
            backend=cast(Backend, backend),
        )
        await inference.start()
        await asyncio.wait_for(inference.wait_ready(), 60)
        adapter = f"bot{suffix}"
        stable_id, candidate_id = fake.add_versions(
            _make_adapter(tiny_model_dir, tmp / "adapter"), adapter, inference.base_fingerprint
        )
        await nc.subscribe(events.METRICS_REQUESTS, cb=on_results)
        await nc.flush()
        gateway = GatewayService(
            GatewaySettings(
                **common,
                instance_id=f"gw-{suffix}",
                releases_durable=f"gwrel-{suffix}",
                redis_url=redis_url,
                registry_address=registry_address,
                inference_endpoints=inference.address,
                metrics_flush_s=0.05,
                http_port=0,
                auth_mode="disabled",  # access control has its own tests (test_access_control.py)
            )
        )
        await gateway.start()
        await gateway.bus.wait_ready(10)
        alias, canary, flagged = f"bot-{suffix}", f"canary-{suffix}", f"flagged-{suffix}"
        for name in (alias, canary, flagged):
            await gateway.releases.set_route(name, stable_id)
        # Only flagged callers reach this candidate: 1% of the rest at most.
        await gateway.releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=flagged,
                candidate_version_id=candidate_id,
                steps=[1, 100],
                flags=[
                    events_pb2.FlagRule(name="vip", users=["vip-user"]),
                    events_pb2.FlagRule(name="beta", metadata={"cohort": "beta"}),
                ],
            )
        )
        await gateway.releases.start_release(
            gateway_pb2.StartReleaseRequest(
                alias=canary, candidate_version_id=candidate_id, steps=[50, 100]
            )
        )
        yield Stack(
            gateway=gateway,
            inference=inference,
            backend=backend,
            base_url=f"http://{gateway.http.address}/v1",
            adapter=adapter,
            alias=alias,
            canary=canary,
            flagged=flagged,
            stable_id=stable_id,
            candidate_id=candidate_id,
            results=results,
        )
    finally:
        if gateway is not None:
            await gateway.stop()
        await nc.close()
        if inference is not None:
            await inference.stop()
        await registry.stop(0)


async def test_models_lists_routed_aliases_and_their_versions(stack: Stack) -> None:
    client = stack.client()
    models = {m.id: m for m in (await client.models.list()).data}
    assert {"base", stack.alias, stack.canary, stack.stable_id, stack.candidate_id} <= set(models)
    canary = cast(dict[str, Any], models[stack.canary].model_extra)["ftops"]
    assert canary["stable_version_id"] == stack.stable_id
    assert (canary["candidate_version_id"], canary["candidate_weight"]) == (stack.candidate_id, 50)
    pointed = cast(dict[str, Any], models[stack.stable_id].model_extra)["ftops"]
    assert set(pointed["aliases"]) == {stack.alias, stack.canary, stack.flagged}

    assert (await client.models.retrieve(stack.alias)).id == stack.alias
    version = await client.models.retrieve(f"{stack.adapter}:1")
    assert cast(dict[str, Any], version.model_extra)["ftops"]["version_id"] == stack.stable_id
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("ghost-model")
    assert "ghost-model" in err.value.message


async def test_completion_goes_through_the_gateway_data_plane(stack: Stack) -> None:
    client = stack.client()
    raw = await client.completions.with_raw_response.create(
        model=stack.alias, prompt=PROMPT, max_tokens=12, temperature=0, user="u-1"
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert completion.object == "text_completion"
    assert completion.model == stack.alias
    assert completion.system_fingerprint == stack.stable_id
    assert raw.headers["x-ftops-arm"] == "stable"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    # The gRPC front end answers the same request identically (greedy decoding).
    async with channel(stack.gateway.address) as ch:
        reply = await gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
            gateway_pb2.GenerateRequest(
                model=stack.alias,
                prompt=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=12),
            )
        )
    assert reply.text == choice.text

    # ...and the result is reported on NATS like any other request, the key's id as tenant.
    result = await stack.result_of(completion.id.removeprefix("cmpl-"))
    assert (result.alias, result.arm, result.version_id) == (stack.alias, "stable", stack.stable_id)
    assert result.status == "OK"
    assert result.completion_tokens == completion.usage.completion_tokens
    assert result.tenant
    assert KEY not in result.tenant


async def test_release_rules_apply_to_http_requests(stack: Stack) -> None:
    client = stack.client()
    arms = set()
    for _ in range(24):
        raw = await client.completions.with_raw_response.create(
            model=stack.canary, prompt=PROMPT, max_tokens=2
        )
        arms.add((raw.headers["x-ftops-arm"], raw.parse().system_fingerprint))
    assert arms == {("stable", stack.stable_id), ("candidate", stack.candidate_id)}


async def test_user_and_metadata_reach_the_flag_rules(stack: Stack) -> None:
    client = stack.client()
    for extra in ({"user": "vip-user"}, {"metadata": {"cohort": "beta"}}):
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model=stack.flagged,
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=2,
                **extra,
            )
            assert raw.headers["x-ftops-arm"] == "candidate", extra
            assert raw.parse().system_fingerprint == stack.candidate_id


async def test_chat_completion_and_its_stream_agree(stack: Stack) -> None:
    client = stack.client()
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
    ]
    chat = await client.chat.completions.create(
        model=stack.alias, messages=messages, max_tokens=10, temperature=0
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None
    assert chat.usage.prompt_tokens > 0

    stream = await client.chat.completions.create(
        model=stack.alias,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


async def test_completion_stream_ends_with_done(stack: Stack) -> None:
    body = {"model": stack.alias, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.base_url}/completions", json={**body, "stream": True}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in [raw async for raw in resp.content]]
    events_ = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events_[-1] == "[DONE]"
    pieces = [json.loads(e) for e in events_[:-1]]
    assert all(p["object"] == "text_completion" for p in pieces)
    assert pieces[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    completion = await stack.client().completions.create(
        model=stack.alias, prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert "".join(p["choices"][0]["text"] for p in pieces) == completion.choices[0].text


async def _long_answer_prompt(stack: Stack) -> str:
    """A prompt of its own whose greedy answer is long: with a short one the stream can end
    normally before the gateway notices the hang-up (the race this test once lost)."""
    for _ in range(20):
        prompt = f"{PROMPT} ({uuid.uuid4().hex[:4]})"
        answer = await stack.client().completions.create(
            model=stack.alias, prompt=prompt, max_tokens=64, temperature=0
        )
        assert answer.usage is not None
        if answer.usage.completion_tokens >= 12:
            return prompt
    raise AssertionError("no prompt with a long answer found")


async def test_client_hanging_up_cancels_the_generation(stack: Stack) -> None:
    prompt = await _long_answer_prompt(stack)
    stack.backend.chunk_delay_s = 0.3
    try:
        body = {"model": stack.alias, "prompt": prompt, "max_tokens": 64, "stream": True}
        body["temperature"] = 0
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{stack.base_url}/completions", json=body)
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            resp.close()  # hang up mid-stream
        # The inference replica learns of it and stops generating.
        while True:
            abandoned = await asyncio.wait_for(stack.backend.abandoned.get(), 5)
            if abandoned == prompt:
                break
        assert time.monotonic() - started < 5
        # The abandoned generation's slot is freed as the stream unwinds.
        assert stack.inference.core.in_flight == 0
    finally:
        stack.backend.chunk_delay_s = 0.0


async def test_a_full_replica_answers_429_with_retry_after(stack: Stack) -> None:
    stack.backend.chunk_delay_s = 0.3
    body = {"model": stack.alias, "prompt": PROMPT, "max_tokens": 64, "stream": True}
    # No queue in front of the replica's two slots: the third request is refused at once.
    admission = stack.inference.core.admission
    limits = admission.limits
    admission.limits = dataclasses.replace(limits, max_queue_length=0)
    try:
        async with aiohttp.ClientSession() as http:
            held = []
            for _ in range(2):  # the replica's whole concurrency, held mid-stream
                resp = await http.post(f"{stack.base_url}/completions", json=body)
                assert resp.status == 200
                await resp.content.readline()
                held.append(resp)
            with pytest.raises(openai.RateLimitError) as err:
                await stack.client().completions.create(
                    model=stack.alias, prompt=PROMPT, max_tokens=2
                )
            assert cast(dict[str, Any], err.value.body)["type"] == "rate_limit_error"
            # How long to wait: whole seconds (rounded up), and milliseconds for the SDKs.
            headers = err.value.response.headers
            assert int(headers["Retry-After"]) >= 1
            assert int(headers["retry-after-ms"]) >= 1
            for resp in held:
                resp.close()
    finally:
        stack.backend.chunk_delay_s = 0.0
        admission.limits = limits
    for _ in range(2):
        await asyncio.wait_for(stack.backend.abandoned.get(), 5)


async def test_bad_requests_get_openai_errors(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=stack.alias, prompt="x", n=2)
    assert bad.value.status_code == 400
    assert cast(dict[str, Any], bad.value.body)["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="ghost-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert cast(dict[str, Any], missing.value.body)["code"] == "model_not_found"
    assert "ghost-model" in missing.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        await client.completions.create(model=stack.alias, prompt="x", temperature=5)
    assert cast(dict[str, Any], hot.value.body)["param"] == "temperature"
    # Refused by the inference service (INVALID_ARGUMENT), mapped to 400.
    with pytest.raises(openai.BadRequestError) as long:
        await client.completions.create(model=stack.alias, prompt="word " * 400)
    assert "tokens" in long.value.message
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=stack.alias,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    # A failure before the first token is a real HTTP status, not an event in a 200.
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="ghost-model", prompt="x", stream=True)

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.base_url}/completions",
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 400
            assert "not valid JSON" in (await resp.json())["error"]["message"]
        async with http.post(
            f"{stack.base_url}/completions",
            json={"model": stack.alias, "prompt": "x"},
            headers={"X-Request-Id": "no spaces\tor tabs"},
        ) as resp:
            assert resp.status == 400
            assert "X-Request-Id" in (await resp.json())["error"]["message"]
        async with http.get(f"{stack.base_url}/engines") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_api_keys_are_enforced_when_configured(stack: Stack) -> None:
    settings = stack.gateway.settings.model_copy(update={"api_keys": KEY, "http_port": 0})
    server = OpenAIHttpServer(stack.gateway.gateway, settings)
    await server.start()
    try:
        url = f"http://{server.address}/v1"
        for key in ("", "sk-wrong"):
            client = openai.AsyncOpenAI(base_url=url, api_key=key or "-", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as err:
                await client.completions.create(model=stack.alias, prompt=PROMPT, max_tokens=2)
            assert "API key" in err.value.message
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
        completion = await client.completions.create(model=stack.alias, prompt=PROMPT, max_tokens=2)
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert any(m.id == stack.alias for m in (await client.models.list()).data)
    finally:
        await server.stop()


async def test_grpc_error_codes_map_to_openai_statuses() -> None:
    from ftops_gateway.openai_errors import from_status

    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.INTERNAL: 500,
    }
    for code, status in expected.items():
        assert from_status(code, "why").status == status, code
