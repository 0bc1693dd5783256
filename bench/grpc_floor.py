"""The floor under any gRPC gateway written in Python on this machine: a pass-through
proxy that forwards Generate's bytes to inference as they are (no parsing, routing, auth,
tracing or reporting). Run in its own process next to the stack by ``gateway_overhead``,
so that what the real gateway adds can be read against what a hop costs at all."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import grpc

METHOD = "/ftops.inference.v1.InferenceService/Generate"


def _identity(data: bytes) -> bytes:
    return data


async def _serve(upstream: str, port: int, ready: Any) -> None:
    async with grpc.aio.insecure_channel(upstream) as channel:
        forward = channel.unary_unary(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )

        async def generate(request: bytes, context: Any) -> bytes:
            response: bytes = await forward(request)
            return response

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ftops.inference.v1.InferenceService",
                    {
                        "Generate": grpc.unary_unary_rpc_method_handler(
                            generate, request_deserializer=_identity, response_serializer=_identity
                        )
                    },
                ),
            )
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()


def _main(upstream: str, port: int, ready: Any) -> None:
    asyncio.run(_serve(upstream, port, ready))


def start(upstream: str, port: int) -> multiprocessing.process.BaseProcess:
    """The proxy in a process of its own, serving once this returns."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_main, args=(upstream, port, ready), daemon=True)
    process.start()
    if not ready.wait(30):
        process.kill()
        raise RuntimeError("the pass-through proxy did not start")
    return process
