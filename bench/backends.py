"""The two inference backends side by side in one run (issue 15): the HF backend
(transformers + PEFT, stacked LoRA) and vLLM's CPU build, each as the inference service of a
whole local stack (as ``ftops-dev up`` and ``ftops-dev up --backend vllm`` run them), on
the tiny model, driven through the public APIs only.

Per backend:
  ready -> first token   from starting the inference process until the first token of a
                         base-model request through the gateway (engine build included)
  1 adapter / 8 adapters completion tokens/s of the same 64 requests (16 at a time,
                         32 tokens, seeded sampling) straight to the replica's gRPC, all on
                         one adapter vs spread over eight
  capacity               the open-loop rate through the gateway at which p99 passes 3x
                         its idle value (bench.release_under_load.find_capacity)

The adapters are random LoRA weights registered as the trainer registers versions
(artifact, version, ``adapter.ready``), so both backends hot-load the same eight files.
HF is the baseline. vLLM is measured where its environment exists (``make install-vllm``);
otherwise the report says so. ``--base-model smollm2`` (or a model directory) runs the same
on a real pretrained model (results under ``backends_<model>``).

    python -m bench.backends [--backends hf,vllm] [--no-capacity] [--base-model tiny|smollm2|PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from bench.hot_load import make_adapters
from bench.release_under_load import ALIAS, find_capacity
from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2_grpc
from ftops_devstack.adapters import register_adapter
from ftops_devstack.base_model import TINY, BaseModelChoice, resolve_base_model
from ftops_devstack.demo import EventLog
from ftops_devstack.servers import start_nats, start_redis
from ftops_devstack.stack import Stack
from ftops_devstack.vllm_env import TINY_MODEL_SETTINGS, VLLMUnavailableError, vllm_python
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel

NAME = "backends"
ADAPTERS = 8
REQUESTS = 64
CONCURRENCY = 16
MAX_TOKENS = 32
PROMPTS = ("Product LZ-59 costs", "The capital of", "Hello there, my friend", "Once upon a")


async def _release(
    registry: registry_pb2_grpc.RegistryServiceStub,
    bus: EventBus,
    log: EventLog,
    adapter_dir: Path,
    adapter: str,
    base_model: str,
) -> str:
    """Registered and announced as the trainer does; returns once the replica loaded it."""
    version = await register_adapter(
        registry, bus, adapter_dir, adapter=adapter, base_model=base_model
    )
    await log.wait_loaded(version.version_id, timeout=300)
    return version.version_id


async def _first_token(
    gateway: gateway_pb2_grpc.GatewayServiceStub, limit_s: float, *, chat: bool
) -> None:
    """Until the gateway streams a first token of the base model (UNAVAILABLE while the
    replica builds its engine or has not announced itself yet). An instruct model is asked
    in chat form: without its template it may end at once."""
    deadline = time.monotonic() + limit_s
    request = gateway_pb2.GenerateRequest(
        model="base", sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    if chat:
        request.messages.add(role="user", content="What is the capital of France?")
    else:
        request.prompt = "The capital of"
    while True:
        try:
            async for chunk in gateway.GenerateStream(request, timeout=60):
                if chunk.text:
                    return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise
        await asyncio.sleep(0.2)


async def _throughput(
    inference: inference_pb2_grpc.InferenceServiceStub, versions: list[str], *, chat: bool
) -> tuple[list[float], float, int]:
    """Latencies (s), wall time (s) and completion tokens of REQUESTS spread over
    ``versions``, CONCURRENCY at a time."""
    latencies: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        nonlocal tokens
        request = inference_pb2.GenerateRequest(
            request_id=f"bench-{i}",
            version_id=versions[i % len(versions)],
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i),
        )
        if chat:
            request.messages.add(role="user", content=f"Tell me about: {PROMPTS[i % 4]}")
        else:
            request.prompt = PROMPTS[i % len(PROMPTS)]
        async with gate:
            t0 = time.perf_counter()
            reply = await inference.Generate(request, timeout=300)
            latencies.append(time.perf_counter() - t0)
            tokens += reply.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return latencies, time.perf_counter() - t0, tokens


async def measure(
    backend: str,
    model: BaseModelChoice,
    adapter_dirs: list[Path],
    work: Path,
    *,
    capacity: bool,
) -> tuple[dict[str, float | str], dict[str, tuple[list[float], float]]]:
    """One backend's figures (notes) and its throughput samples per case."""
    nats_server, redis_server = start_nats(), start_redis()
    stack = Stack(
        work / backend,
        nats_server.url,
        redis_server.url,
        model.path,
        base_model_name=model.name,
        extra_env={"FTOPS_SHUTDOWN_GRACE_S": "2", **model.env},
    )
    if backend == "vllm":
        stack.interpreters["inference"] = str(vllm_python())
        stack.service_env["inference"] = dict(TINY_MODEL_SETTINGS)
    log = EventLog(lambda line: None)
    bus = EventBus(nats_server.url, service="trainer", instance="bench-backends")
    channels: dict[str, grpc.aio.Channel] = {}
    notes: dict[str, float | str] = {}
    samples: dict[str, tuple[list[float], float]] = {}
    try:
        started = time.monotonic()
        stack.start()
        channels = {n: channel(stack.address(n)) for n in ("gateway", "registry", "inference")}
        gateway = gateway_pb2_grpc.GatewayServiceStub(channels["gateway"])
        chat = not model.tiny
        await _first_token(gateway, 900, chat=chat)
        notes["ready -> first token (s)"] = round(time.monotonic() - started, 1)
        await stack.wait_serving(timeout=300)
        await log.start(nats_server.url)
        await bus.start()
        await bus.wait_ready(30)
        registry = registry_pb2_grpc.RegistryServiceStub(channels["registry"])
        versions = [
            await _release(registry, bus, log, d, f"bench-{i}", model.name)
            for i, d in enumerate(adapter_dirs)
        ]
        inference = inference_pb2_grpc.InferenceServiceStub(channels["inference"])
        await _throughput(inference, versions, chat=chat)  # warm-up: every adapter once
        for case, chosen in (("1 adapter", versions[:1]), ("8 adapters", versions)):
            latencies, wall, tokens = await _throughput(inference, chosen, chat=chat)
            notes[f"{case}: tokens/s"] = round(tokens / wall, 1)
            samples[case] = (latencies, wall)
        notes["8 adapters vs 1 (tokens/s)"] = round(
            float(notes["8 adapters: tokens/s"]) / float(notes["1 adapter: tokens/s"]), 3
        )
        if capacity and chat:
            # The load generator sends raw prompts, which an instruct model may end at once.
            notes["capacity through the gateway"] = "not measured (raw-prompt load generator)"
        elif capacity:
            await gateway.SetRoute(gateway_pb2.SetRouteRequest(alias=ALIAS, version_id=versions[0]))
            capacity_notes: dict[str, float | str] = {}
            notes["capacity through the gateway (req/s)"] = await find_capacity(
                gateway, capacity_notes
            )
            notes["idle p99 through the gateway (ms)"] = capacity_notes.get(
                "idle p99 (ms, 4 req/s)", ""
            )
    finally:
        for ch in channels.values():
            await ch.close()
        await bus.close()
        await log.close()
        stack.stop()
        redis_server.stop()
        nats_server.stop()
    return notes, samples


async def main(backends: list[str], *, capacity: bool = True, base_model: str = TINY) -> Path:
    model = resolve_base_model(base_model)
    report = Report(
        NAME if model.tiny else f"{NAME}_{model.name}",
        f"HF (transformers + PEFT) vs vLLM (CPU build) inference, {model.name}, whole stack",
        "the HF backend, measured in the same run",
    )
    with tempfile.TemporaryDirectory(prefix="ftops-bench-backends-") as tmp:
        work = Path(tmp)
        adapter_dirs = make_adapters(model.path, work / "adapters", ADAPTERS)
        figures: dict[str, dict[str, float | str]] = {}
        for backend in backends:
            try:
                notes, samples = await measure(
                    backend, model, adapter_dirs, work, capacity=capacity
                )
            except VLLMUnavailableError as exc:
                report.notes[f"{backend}: not measured"] = str(exc)
                continue
            figures[backend] = notes
            for case, (latencies, wall) in samples.items():
                report.add(f"{backend}: {case}", latencies, wall)
            for key, value in notes.items():
                report.notes[f"{backend}: {key}"] = value
        if "hf" in figures and "vllm" in figures:
            for key in ("1 adapter: tokens/s", "8 adapters: tokens/s"):
                report.notes[f"vllm vs hf, {key}"] = round(
                    float(figures["vllm"][key]) / float(figures["hf"][key]), 3
                )
    return report.write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--no-capacity", action="store_true")
    parser.add_argument("--base-model", default=TINY, help="tiny, smollm2 or a model directory")
    args = parser.parse_args()
    asyncio.run(
        main(args.backends.split(","), capacity=not args.no_capacity, base_model=args.base_model)
    )
