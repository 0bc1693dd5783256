"""``ftops release ...`` against a real gateway (fake registry and inference; no monitor:
the figures part of status/watch shows "none")."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_gateway_service import (  # type: ignore[import-not-found]
    Fakes,
    _alias,
    _gateway,
    _settings,
    _until,
    fakes,
)
from typer.testing import CliRunner, Result

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_cli.app import app
from ftops_devstack.servers import free_port
from ftops_gateway.service import GatewayService
from ftops_runtime.events import new_meta

pytestmark = pytest.mark.integration
__all__ = ["fakes"]


async def _cli(gw: GatewayService, *args: str, ok: bool = True) -> Result:
    # The CLI runs its own event loop: keep it off the one serving the gateway.
    monitor = f"127.0.0.1:{free_port()}"  # nothing there: figures are optional
    result = await asyncio.to_thread(
        CliRunner().invoke, app, [f"--gateway={gw.address}", f"--monitor={monitor}", *args]
    )
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _json(result: Result) -> Any:
    return json.loads(result.stdout)


async def test_release_commands(nats_url: str, redis_url: str, fakes: Fakes) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        await _cli(gw, "route", "set", alias, "ver_s")
        started = await _cli(
            gw,
            "release",
            "start",
            alias,
            "ver_c",
            "--steps",
            "10,50,100",
            "--sticky",
            "--flag",
            "name=staff;tenant=internal",
            "--shadow-percent",
            "20",
            "--on-inconclusive",
            "hold",
            "-o",
            "json",
        )
        route = _json(started)
        assert (route["candidateWeight"], route["sticky"], route["shadowPercent"]) == (
            10,
            True,
            20,
        )
        assert route["flags"][0] == {"name": "staff", "tenants": ["internal"], "arm": "candidate"}
        assert route["analysis"]["onInconclusive"] == "INCONCLUSIVE_ACTION_HOLD"

        paused = _json(await _cli(gw, "release", "pause", alias, "--reason", "why", "-o", "json"))
        assert paused["state"] == "paused"
        failed = await _cli(gw, "release", "pause", alias, ok=False)
        assert failed.exit_code != 0
        assert "already paused" in failed.output
        await _cli(gw, "release", "resume", alias)

        step = _json(await _cli(gw, "release", "promote", alias, "-o", "json"))
        assert (step["state"], step["route"]["candidateWeight"]) == ("running", 50)
        table = await _cli(gw, "release", "status", alias)
        assert "running" in table.stdout
        assert "[50%]" in table.stdout

        listed = _json(await _cli(gw, "release", "list", "--active", "-o", "json"))
        assert alias in {r["route"]["alias"] for r in listed["releases"]}

        final = _json(await _cli(gw, "release", "promote", alias, "--final", "-o", "json"))
        assert (final["state"], final["route"]["stableVersionId"]) == ("promoted", "ver_c")
        # After a completed promotion, rollback undoes it.
        back = _json(await _cli(gw, "release", "rollback", alias, "-o", "json"))
        assert (back["state"], back["route"]["stableVersionId"]) == ("rolled_back", "ver_s")

        bad = await _cli(gw, "release", "start", alias, "ver_c", "--flag", "tenant", ok=False)
        assert "KEY=VALUE" in bad.output
    finally:
        await gw.stop()


async def test_watch_prints_each_change_until_the_end(
    nats_url: str, redis_url: str, fakes: Fakes
) -> None:
    gw: GatewayService = await _gateway(_settings(nats_url, redis_url, fakes))
    alias = _alias()
    try:
        await gw.releases.set_route(alias, "ver_s")
        route = await gw.releases.start_release(
            gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id="ver_c", steps=[50])
        )
        watch = asyncio.create_task(_cli(gw, "release", "watch", alias, "-o", "json"))
        # The watcher is subscribed once the gateway has a queue for the alias.
        await _until(lambda: alias in gw.routes._watchers)
        await gw.releases.on_promote(
            events_pb2.ReleasePromote(
                meta=new_meta("monitor", "t"),
                release_id=route.release_id,
                alias=alias,
                candidate_version_id="ver_c",
                stable_version_id="ver_s",
                step_index=0,
                weight=100,
                final=True,
                reason="all good",
            ),
            None,  # type: ignore[arg-type]
        )
        result = await asyncio.wait_for(watch, 20)
        states = [json.loads(line)["state"] for line in result.stdout.splitlines()]
        assert states == ["running", "promoted"]
        table = await _cli(gw, "release", "watch", alias)
        assert "promoted" in table.stdout
        assert "all good" in table.stdout
    finally:
        await gw.stop()
