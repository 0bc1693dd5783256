"""The soak: the whole stack for a few minutes under load with releases and jobs on a
schedule, sampled for growth (ftops_devstack.soak; ``python -m bench.soak --minutes 30``
is the full run).

It runs with ``make test-soak`` (FTOPS_SOAK=1), not in ``make test``: it takes minutes.
FTOPS_SOAK_MINUTES sets its length (3 by default)."""

from __future__ import annotations

import os

# Before gRPC loads: the stack starts services (fork + exec) while this process has calls
# in flight (see tests/chaos/conftest.py).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from pathlib import Path

import pytest

from ftops_devstack.soak import SoakRun, soak

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FTOPS_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="the soak runs with make test-soak (FTOPS_SOAK=1)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def soak_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> SoakRun:
    minutes = float(os.environ.get("FTOPS_SOAK_MINUTES", "3"))
    run = await soak(tmp_path_factory.mktemp("soak"), tiny_model_dir, minutes)
    for growth in run.growth:
        print(f"{growth.name}: {growth.line()}{'' if growth.ok else '  <-- FAILS'}")
    return run
