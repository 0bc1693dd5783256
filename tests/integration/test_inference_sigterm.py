"""SIGTERM on a real ``ftops-inference`` process: the stream in flight finishes, new
requests are refused with UNAVAILABLE meanwhile, and the process exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops_devstack.lifetime import die_with_parent

pytestmark = pytest.mark.integration

WORDS = 20
TOKEN_DELAY_MS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sigterm_drains_in_flight_requests_then_exits(
    nats_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "FTOPS_BACKEND": "echo",
        "FTOPS_ECHO_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
        "FTOPS_GRPC_PORT": str(port),
        "FTOPS_NATS_URL": nats_url,
        "FTOPS_INSTANCE_ID": f"sigterm-{uuid.uuid4().hex[:6]}",
        "FTOPS_BASE_MODEL_PATH": str(tiny_model_dir),
        "FTOPS_ADAPTER_CACHE_DIR": str(tmp_path / "cache"),
        # No registry: generation with the base works, health stays NOT_SERVING.
        "FTOPS_REGISTRY_ADDRESS": "127.0.0.1:1",
        "FTOPS_DRAIN_TIMEOUT_S": "20",
        "FTOPS_AUTH_MODE": "disabled",  # no registry to check keys with
        "FTOPS_DEV_MODE": "true",  # auth may be off only in development mode
    }
    log = (tmp_path / "inference.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ftops_inference",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
        preexec_fn=die_with_parent(),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = inference_pb2_grpc.InferenceServiceStub(chan)
            prompt = " ".join(f"w{i}" for i in range(WORDS))
            request = inference_pb2.GenerateRequest(
                prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=WORDS)
            )
            first = None
            for _ in range(200):  # until the process listens and the backend is up
                try:
                    call = stub.GenerateStream(request, timeout=30)
                    first = await call.read()
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            assert first is not None
            assert first.text == "w0"

            proc.send_signal(signal.SIGTERM)
            refused = None
            for _ in range(100):  # the drain starts as soon as the signal is handled
                try:
                    await stub.Generate(inference_pb2.GenerateRequest(prompt="late"), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
                await asyncio.sleep(0.02)
            assert refused is not None
            assert refused.code() == grpc.StatusCode.UNAVAILABLE

            rest = []
            while (chunk := await call.read()) != grpc.aio.EOF:
                rest.append(chunk)
            assert "".join([first.text, *(c.text for c in rest)]) == prompt
            assert rest[-1].finish_reason == common_pb2.FINISH_REASON_EOS
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, (tmp_path / "inference.log").read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
