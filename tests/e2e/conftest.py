"""The five services as processes, started once for every end-to-end test module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftops_devstack.servers import ManagedServer
from ftops_devstack.stack import Stack


@pytest.fixture(scope="session")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: ManagedServer,
    redis_server: ManagedServer,
    tiny_model_dir: Path,
) -> AsyncIterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("stack"),
        nats_server.url,
        redis_server.url,
        tiny_model_dir,
        extra_env={"FTOPS_SHUTDOWN_GRACE_S": "2"},
    )
    stack.start()
    try:
        await stack.wait_serving(timeout=240)
        yield stack
    finally:
        stack.stop()
