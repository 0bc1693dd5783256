"""The monitor's HTTP endpoint with access control on, over real sockets: a real registry
(keys, teams, versions, the audit log), a real monitor and real NATS. ``/metrics``, the
dashboard and its live feed need a key, and show each caller only its teams' aliases and
versions (a platform admin all of them)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import pytest

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import auth, hashing
from ftops_runtime.auth import Role
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
from ftops_runtime.events import METRICS_REQUESTS, MONITOR_ALERT, new_meta

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

if TYPE_CHECKING:
    RegistryStub = registry_pb2_grpc.RegistryServiceAsyncStub

TEAMS = ("alpha", "beta")


@dataclass
class World:
    admin: RegistryStub
    admin_key: str
    monitor: MonitorService
    viewers: dict[str, str]
    aliases: dict[str, str]
    versions: dict[str, str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.monitor.metrics_port}"


async def _version(admin: RegistryStub, team: str) -> str:
    data = f"{team} weights {uuid.uuid4().hex}".encode()
    files = [
        common_pb2.ArtifactFile(
            path="adapter_model.safetensors",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
    ]

    async def parts() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(
            header=registry_pb2.UploadHeader(files=files, team=team)
        )
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=0, data=data)
        )

    artifact = await admin.UploadArtifact(parts())
    version = await admin.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter=f"{team}-bot",
            team=team,
            base_model="tiny-base",
            artifact_id=artifact.artifact_id,
        )
    )
    return str(version.version_id)


def _results(alias: str, version_id: str, n: int = 20) -> events_pb2.RequestResultBatch:
    batch = events_pb2.RequestResultBatch(meta=new_meta("gateway", "test"))
    for _ in range(n):
        result = batch.results.add(
            request_id=uuid.uuid4().hex,
            alias=alias,
            version_id=version_id,
            arm="stable",
            latency_ms=40.0,
            status="OK",
        )
        result.finished_at.GetCurrentTime()
    return batch


def _alert(alias: str, version_id: str) -> events_pb2.Alert:
    return events_pb2.Alert(
        meta=new_meta("monitor", "test"),
        rule="error_rate",
        alias=alias,
        version_id=version_id,
        state="firing",
        value=0.5,
        threshold=0.1,
        message=f"{alias} fails",
    )


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, nats_url: str, tiny_model_dir: Path
) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("monitor-http")
    suffix = uuid.uuid4().hex[:6]
    admin_key = auth.new_api_key()[1]
    common: dict[str, Any] = {
        "grpc_port": 0,
        "nats_url": nats_url,
        "health_interval_s": 0.2,
        "shutdown_grace_s": 0.5,
        "auth_mode": "enabled",
    }
    registry = RegistryApp(
        RegistrySettings(
            **common,
            database_url=f"sqlite:///{tmp}/registry.db",
            artifact_dir=tmp / "artifacts",
            instance_id=f"reg-{suffix}",
            bootstrap_admin_key=admin_key,
        ),
        durable=f"registry-monhttp-{suffix}",
    )
    await registry.start()
    await registry.wait_ready()
    monitor = MonitorService(
        MonitorSettings(
            **common,
            instance_id=f"mon-{suffix}",
            metrics_port=0,
            registry_address=registry.address,
            registry_api_key=admin_key,
            auth_cache_ttl_s=30.0,
        )
    )
    admin_channel = channel(registry.address, api_key=admin_key)
    admin = cast("RegistryStub", registry_pb2_grpc.RegistryServiceStub(admin_channel))
    await monitor.start()
    try:
        await monitor.bus.wait_ready(10)
        await admin.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                name="tiny-base",
                fingerprint=hashing.model_fingerprint(tiny_model_dir),
                uri=str(tiny_model_dir),
            )
        )
        viewers, aliases, versions = {}, {}, {}
        for team in TEAMS:
            await admin.CreateTeam(registry_pb2.CreateTeamRequest(name=team))
            created = await admin.CreateApiKey(
                registry_pb2.CreateApiKeyRequest(
                    name=f"{team}-viewer",
                    roles=[registry_pb2.TeamRole(team=team, role=auth.role_to_proto(Role.viewer))],
                )
            )
            viewers[team] = created.secret
            versions[team] = await _version(admin, team)
            aliases[team] = f"{team}-chat-{suffix}"
        w = World(admin, admin_key, monitor, viewers, aliases, versions)
        async with EventBus(nats_url, service="test", instance=suffix) as bus:
            await bus.wait_ready(10)
            for team in TEAMS:
                await bus.publish(METRICS_REQUESTS, _results(aliases[team], versions[team]))
                await bus.publish(MONITOR_ALERT, _alert(aliases[team], versions[team]))
        await _eventually(lambda: len(list(monitor.monitor.stats.keys(None))) >= 2 or None)
        yield w
    finally:
        await admin_channel.close()
        await monitor.stop()
        await registry.stop()


async def _eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while (value := check()) is None:
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
    return value


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _get(world: World, path: str, key: str = "") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(world.base + path, headers=_bearer(key) if key else {}) as response,
    ):
        return response.status, await response.text()


async def _state_aliases(world: World, key: str, part: str) -> set[str]:
    status, body = await _get(world, "/dashboard/state", key)
    assert status == 200, body
    return {item["alias"] for item in json.loads(body)[part]}


async def _stream_snapshot(http: aiohttp.ClientSession, url: str, **kw: Any) -> dict[str, Any]:
    async with http.get(url, **kw) as stream:
        assert stream.status == 200, await stream.text()
        assert await stream.content.readline() == b"event: snapshot\n"
        line = await stream.content.readline()
        snapshot: dict[str, Any] = json.loads(line.removeprefix(b"data: "))
        return snapshot


async def test_every_page_needs_a_key(world: World) -> None:
    for path in ("/metrics", "/dashboard", "/dashboard/state", "/dashboard/stream"):
        status, body = await _get(world, path)
        assert status == 401, (path, body)
        assert "missing API key" in body
        status, body = await _get(world, path, auth.new_api_key()[1])
        assert status == 401, (path, body)


async def test_metrics_show_only_the_callers_teams(world: World) -> None:
    alpha, beta = world.aliases["alpha"], world.aliases["beta"]
    status, body = await _get(world, "/metrics", world.viewers["alpha"])
    assert status == 200
    assert f'alias="{alpha}"' in body
    assert f'alias="{beta}"' not in body
    assert world.versions["beta"] not in body
    _, body = await _get(world, "/metrics", world.viewers["beta"])
    assert f'alias="{beta}"' in body
    assert f'alias="{alpha}"' not in body
    _, body = await _get(world, "/metrics", world.admin_key)
    assert f'alias="{alpha}"' in body
    assert f'alias="{beta}"' in body


async def test_dashboard_data_and_feed_show_only_the_callers_teams(world: World) -> None:
    alpha, beta = world.aliases["alpha"], world.aliases["beta"]

    async def charted(key: str, wanted: set[str]) -> set[str]:
        async def seen() -> set[str]:
            return await _state_aliases(world, key, "versions")

        deadline = time.monotonic() + 10
        found = await seen()
        while not wanted <= found and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            found = await seen()
        return found

    assert await charted(world.admin_key, {alpha, beta}) >= {alpha, beta}
    assert await charted(world.viewers["alpha"], {alpha}) == {alpha}
    # The event list (the alerts published above) and the page itself.
    assert await _state_aliases(world, world.viewers["alpha"], "events") == {alpha}
    assert await _state_aliases(world, world.admin_key, "events") >= {alpha, beta}
    status, page = await _get(world, "/dashboard", world.viewers["alpha"])
    assert status == 200
    assert alpha in page
    assert beta not in page
    # The live feed's first message.
    async with aiohttp.ClientSession() as http:
        snapshot = await _stream_snapshot(
            http, world.base + "/dashboard/stream", headers=_bearer(world.viewers["beta"])
        )
    shown = {i["alias"] for part in ("versions", "events") for i in snapshot[part]}
    assert shown == {beta}


async def test_a_browser_hands_the_key_over_once_and_keeps_it_in_a_cookie(world: World) -> None:
    alpha, beta = world.aliases["alpha"], world.aliases["beta"]
    key = world.viewers["alpha"]
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{world.base}/dashboard?key={key}", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/dashboard"  # the key left the address
            cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=Strict" in cookie
        async with http.get(f"{world.base}/dashboard") as page:
            assert page.status == 200
            text = await page.text()
            assert alpha in text
            assert beta not in text
        snapshot = await _stream_snapshot(http, world.base + "/dashboard/stream")
        assert {i["alias"] for i in snapshot["events"]} == {alpha}
        # Leaving forgets the key.
        async with http.get(f"{world.base}/dashboard/logout") as page:
            assert page.status == 401
            assert 'action="/dashboard/login"' in await page.text()  # the form
        # The form posts the key: the same cookie, no key in any address.
        login = f"{world.base}/dashboard/login"
        async with http.post(login, data={"key": world.viewers["beta"]}) as page:
            assert page.status == 200
            text = await page.text()
            assert beta in text
            assert alpha not in text
    async with aiohttp.ClientSession() as http:
        wrong = f"{world.base}/dashboard?key={auth.new_api_key()[1]}"
        async with http.get(wrong, allow_redirects=False) as response:
            assert response.status == 401
            assert "Set-Cookie" not in response.headers


async def test_a_revoked_key_is_refused_at_once_and_refusals_are_audited(world: World) -> None:
    since = time.time()
    created = await world.admin.CreateApiKey(
        registry_pb2.CreateApiKeyRequest(
            name="scraper",
            roles=[registry_pb2.TeamRole(team="alpha", role=auth.role_to_proto(Role.viewer))],
        )
    )
    assert (await _get(world, "/metrics", created.secret))[0] == 200  # now cached (30 s)
    await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
    deadline = time.monotonic() + 2.0
    while (status := (await _get(world, "/metrics", created.secret))[0]) == 200:
        assert time.monotonic() < deadline, "the revoked key still works"
        await asyncio.sleep(0.05)
    assert status == 401
    await _get(world, "/dashboard/state")  # no key at all

    from google.protobuf.timestamp_pb2 import Timestamp

    after = Timestamp()
    after.FromSeconds(int(since) - 1)
    wanted = {
        (created.key.key_id, "HTTP GET /metrics"),
        ("anonymous", "HTTP GET /dashboard/state"),
    }
    deadline = time.monotonic() + 10
    while True:
        listed = await world.admin.ListAudit(
            registry_pb2.ListAuditRequest(
                resource_prefix="service:monitor", since=after, page_size=500
            )
        )
        found = {(e.actor, e.method) for e in listed.entries if e.outcome == "UNAUTHENTICATED"}
        if wanted <= found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert wanted <= found
    secret = created.secret.rsplit("_", 1)[1]
    assert not any(secret in e.detail for e in listed.entries)
