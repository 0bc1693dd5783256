"""Gateway overhead (issue 5, bench 3): the same short generation sent straight to the
inference service (baseline) and through the gateway (routing, replica choice, metrics
reporting), same run, on the full stack of separate processes with the inference service's
echo backend (no model: what is measured is the gateway, not the forward pass).
Sequential latency (target: at most 1 ms added at p50), 8-way concurrent latency, and the
requests per second one gateway process sustains under 64 concurrent clients.

A third sequential case goes through a pass-through proxy (bench/grpc_floor.py: bytes
forwarded as they are, nothing else): the least any gRPC hop in Python adds here, so what
the gateway itself adds is the difference between the two. The gateway reaches inference
over its multiplexed stream; ``FTOPS_INFERENCE_TRANSPORT=unary python -m
bench.gateway_overhead`` measures it with one gRPC call per request instead."""

from __future__ import annotations

import asyncio
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import grpc

from bench import grpc_floor
from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_devstack.servers import free_port, start_nats, start_redis
from ftops_devstack.stack import Stack

N = 500
CONCURRENCY = 8
SATURATION = 64
PROMPT = "Product LZ-59 costs"
SAMPLING = common_pb2.SamplingParams(max_tokens=1, temperature=0)


async def _sequential(call: object, n: int) -> list[float]:
    assert callable(call)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return samples


async def _concurrent(
    call: object, n: int, concurrency: int = CONCURRENCY
) -> tuple[list[float], float]:
    assert callable(call)
    samples: list[float] = []
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


async def main() -> None:
    from ftops_tinymodel import build

    nats, redis = start_nats(), start_redis()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), nats.url, redis.url, build(), extra_env={"FTOPS_BACKEND": "echo"})
        floor: BaseProcess | None = None
        try:
            stack.start()
            await stack.wait_serving()
            floor_port = free_port()
            floor = grpc_floor.start(stack.address("inference"), floor_port)
            async with (
                grpc.aio.insecure_channel(stack.address("inference")) as ich,
                grpc.aio.insecure_channel(stack.address("gateway")) as gch,
                grpc.aio.insecure_channel(f"127.0.0.1:{floor_port}") as fch,
            ):
                inference = inference_pb2_grpc.InferenceServiceStub(ich)
                gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
                proxied = inference_pb2_grpc.InferenceServiceStub(fch)

                async def direct() -> None:
                    await inference.Generate(
                        inference_pb2.GenerateRequest(prompt=PROMPT, sampling=SAMPLING)
                    )

                async def passed_through() -> None:
                    await proxied.Generate(
                        inference_pb2.GenerateRequest(prompt=PROMPT, sampling=SAMPLING)
                    )

                async def routed() -> None:
                    await gateway.Generate(
                        gateway_pb2.GenerateRequest(model="base", prompt=PROMPT, sampling=SAMPLING)
                    )

                for call in (direct, passed_through, routed):  # warm every path
                    await _sequential(call, 100)
                report = Report(
                    "gateway_overhead",
                    f"1-token generation on the echo backend, {N} requests per case",
                    "direct to the inference service",
                )
                base = report.add("direct, sequential", await _sequential(direct, N))
                via = report.add("gateway, sequential", await _sequential(routed, N))
                hop = report.add(
                    "pass-through proxy, sequential", await _sequential(passed_through, N)
                )
                samples, wall = await _concurrent(direct, N)
                base_c = report.add(f"direct, {CONCURRENCY} concurrent", samples, wall)
                samples, wall = await _concurrent(routed, N)
                via_c = report.add(f"gateway, {CONCURRENCY} concurrent", samples, wall)
                samples, wall = await _concurrent(direct, 4 * N, SATURATION)
                base_s = report.add(f"direct, {SATURATION} concurrent", samples, wall)
                samples, wall = await _concurrent(routed, 4 * N, SATURATION)
                via_s = report.add(f"gateway, {SATURATION} concurrent", samples, wall)
                report.notes["added p50 latency (sequential)"] = (
                    f"{via.p50_ms - base.p50_ms:.2f} ms"
                )
                report.notes["a bare Python gRPC hop adds (p50)"] = (
                    f"{hop.p50_ms - base.p50_ms:.2f} ms; the gateway adds "
                    f"{via.p50_ms - hop.p50_ms:.2f} ms over it"
                )
                report.notes["added p99 latency (sequential)"] = (
                    f"{via.p99_ms - base.p99_ms:.2f} ms"
                )
                report.notes["one gateway process sustains"] = (
                    f"{via_s.per_s:.0f} req/s ({SATURATION} clients; direct {base_s.per_s:.0f})"
                )
                report.notes["throughput vs direct (concurrent)"] = (
                    f"{via_c.per_s / base_c.per_s:.2f}x"
                )
                report.write()
        finally:
            if floor is not None:
                floor.kill()
            stack.stop()
            redis.stop()
            nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
