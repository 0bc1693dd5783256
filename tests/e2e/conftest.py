"""The five services as processes, started once for every end-to-end test module.

The stack gets NATS and Redis servers of its own: its inference replica announces itself on
``adapter.loaded`` and its services consume shared subjects, so on the session's servers it
would leak into the integration tests (gateways would discover it, monitors would judge it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftops_devstack.servers import start_nats, start_redis
from ftops_devstack.stack import Stack


@pytest.fixture(scope="session")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> AsyncIterator[Stack]:
    nats_server = start_nats()
    redis_server = start_redis()
    stack = Stack(
        tmp_path_factory.mktemp("stack"),
        nats_server.url,
        redis_server.url,
        tiny_model_dir,
        extra_env={"FTOPS_SHUTDOWN_GRACE_S": "2"},
    )
    try:
        stack.start()
        await stack.wait_serving(timeout=240)
        yield stack
    finally:
        stack.stop()
        redis_server.stop()
        nats_server.stop()
