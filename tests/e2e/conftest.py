"""The five services as processes, started once for every end-to-end test module.

The stack gets NATS and Redis servers of its own: its inference replica announces itself on
``adapter.loaded`` and its services consume shared subjects, so on the session's servers it
would leak into the integration tests (gateways would discover it, monitors would judge it).

Access control is on, as in production: the stack's generated platform-admin key is
``stack.api_key``, and ``FTOPS_API_KEY`` for the in-process CLI while the stack runs."""

from __future__ import annotations

import os
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
        auth=True,
    )
    saved_key = os.environ.get("FTOPS_API_KEY")
    try:
        stack.start()
        if stack.api_key:
            os.environ["FTOPS_API_KEY"] = stack.api_key
        await stack.wait_serving(timeout=240)
        yield stack
    finally:
        if saved_key is None:
            os.environ.pop("FTOPS_API_KEY", None)
        else:
            os.environ["FTOPS_API_KEY"] = saved_key
        stack.stop()
        redis_server.stop()
        nats_server.stop()
