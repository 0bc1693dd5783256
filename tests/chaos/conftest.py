"""The chaos suite: one stack (two gateways, two inference replicas, NATS with JetStream on
disk behind a proxy that can cut it off, Redis with an append-only file, the registry on a
throwaway Postgres database behind another such proxy where a Postgres is reachable)
shared by every fault; each fault leaves it whole.

It runs with ``make test-chaos`` (FTOPS_CHAOS=1), not in ``make test``: it kills
processes and servers on purpose and takes minutes."""

from __future__ import annotations

import os

# Before gRPC loads: the stack restarts services (fork + exec) while this process has
# calls in flight, and gRPC's fork handlers then abort the child now and then
# (ev_epoll1_linux.cc "Check failed: next_worker->state == KICKED").
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftops_devstack.chaos import ChaosEnv, postgres_admin_url, start_env, stop_env

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FTOPS_CHAOS") == "1":
        return
    skip = pytest.mark.skip(reason="the chaos suite runs with make test-chaos (FTOPS_CHAOS=1)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def chaos(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> AsyncIterator[ChaosEnv]:
    # The registry on Postgres (a throwaway database behind a proxy the Postgres fault
    # cuts) where one is reachable, as in production; on SQLite otherwise.
    env = await start_env(
        tmp_path_factory.mktemp("chaos"), tiny_model_dir, postgres_admin=postgres_admin_url()
    )
    try:
        yield env
    finally:
        await stop_env(env)
