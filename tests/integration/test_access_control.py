"""Access control of the gateway, the monitor and the trainer over real gRPC: a real
registry (SQLite, auth on) holds teams alpha and beta with a key per role in each; the
services check every caller through the registry's ``Authenticate`` and authorize against
the team of the alias, version or job concerned. Two gateway replicas share one Redis,
so a key's rate limit is shared; inference is a small echo server (the gateway's request
path, not a model, is under test)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import aiohttp
import grpc
import pytest

import ftops_tinymodel
from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_devstack.servers import free_port
from ftops_devstack.stack import SERVICES, Stack
from ftops_gateway.rate_limit import Limit, RateLimiter, limiter_client, parse_team_limits
from ftops_gateway.service import GatewayService
from ftops_gateway.settings import GatewaySettings
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import auth, hashing
from ftops_runtime.auth import AuthPrincipal, Role
from ftops_runtime.client import channel
from ftops_trainer.app import TrainerApp
from ftops_trainer.settings import TrainerSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

if TYPE_CHECKING:
    RegistryStub = registry_pb2_grpc.RegistryServiceAsyncStub
    GatewayStub = gateway_pb2_grpc.GatewayServiceAsyncStub
    MonitorStub = monitor_pb2_grpc.MonitorServiceAsyncStub
    TrainerStub = trainer_pb2_grpc.TrainerServiceAsyncStub

T = TypeVar("T")
TEAMS = ("alpha", "beta")
BASE = "tiny-base"
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
# The production default: a revoked key must stop working long before it runs out.
AUTH_TTL_S = 30.0
REVOCATION_S = 1.0
LIMITED_TEAM = "limited"
LIMIT = Limit(rps=2.0, burst=2)


class EchoInference(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            version_id=request.version_id,
            text=f"[{request.version_id or 'base'}] {request.prompt}",
            prompt_tokens=2,
            completion_tokens=2,
            finish_reason=common_pb2.FINISH_REASON_EOS,
        )

    async def GenerateStream(
        self, request: Any, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        yield inference_pb2.GenerateChunk(
            request_id=request.request_id,
            version_id=request.version_id,
            text="ok",
            completion_tokens=1,
            prompt_tokens=2,
            finish_reason=common_pb2.FINISH_REASON_EOS,
        )


@dataclass
class World:
    registry: RegistryApp
    admin: RegistryStub
    gateways: list[GatewayService]
    monitor: MonitorService
    trainer: TrainerApp
    admin_key: str
    keys: dict[tuple[str, Role], str] = field(default_factory=dict)
    versions: dict[str, list[str]] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str, key: str) -> grpc.aio.Channel:
        ch = channel(address, api_key=key)
        self.channels.append(ch)
        return ch

    def gateway(self, key: str, replica: int = 0) -> GatewayStub:
        ch = self._channel(self.gateways[replica].address, key)
        return cast("GatewayStub", gateway_pb2_grpc.GatewayServiceStub(ch))

    def monitor_stub(self, key: str) -> MonitorStub:
        ch = self._channel(self.monitor.address, key)
        return cast("MonitorStub", monitor_pb2_grpc.MonitorServiceStub(ch))

    def trainer_stub(self, key: str) -> TrainerStub:
        ch = self._channel(self.trainer.address, key)
        return cast("TrainerStub", trainer_pb2_grpc.TrainerServiceStub(ch))

    def key(self, team: str, role: Role) -> str:
        return self.keys[team, role]

    async def new_key(self, name: str, roles: dict[str, Role]) -> registry_pb2.CreateApiKeyResponse:
        created: registry_pb2.CreateApiKeyResponse = await self.admin.CreateApiKey(
            registry_pb2.CreateApiKeyRequest(
                name=name,
                roles=[
                    registry_pb2.TeamRole(team=t, role=auth.role_to_proto(r))
                    for t, r in roles.items()
                ],
            )
        )
        return created

    async def route(self, team: str, version: int = 0) -> str:
        """A fresh alias of ``team`` routed to one of its versions."""
        alias = f"{team}-{uuid.uuid4().hex[:6]}"
        await self.gateway(self.key(team, Role.releaser)).SetRoute(
            gateway_pb2.SetRouteRequest(alias=alias, version_id=self.versions[team][version])
        )
        return alias

    async def release(self, team: str) -> str:
        """A fresh alias of ``team`` with a canary of its second version running."""
        alias = await self.route(team)
        await self.gateway(self.key(team, Role.releaser)).StartRelease(
            gateway_pb2.StartReleaseRequest(
                alias=alias, candidate_version_id=self.versions[team][1]
            )
        )
        return alias


async def refused(call: Awaitable[Any], code: grpc.StatusCode = DENIED) -> str:
    """The call fails with ``code``; its message."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


async def refused_stream(stream: Any, code: grpc.StatusCode = DENIED) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


async def eventually(check: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while (value := check()) is None:
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
    return value


async def _upload(stub: RegistryStub, data: bytes, team: str) -> str:
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

    artifact: registry_pb2.Artifact = await stub.UploadArtifact(parts())
    return str(artifact.artifact_id)


async def _populate(world: World, tiny_model_dir: Path) -> None:
    await world.admin.RegisterBaseModel(
        registry_pb2.RegisterBaseModelRequest(
            name=BASE,
            fingerprint=hashing.model_fingerprint(tiny_model_dir),
            uri=str(tiny_model_dir),
        )
    )
    for team in (*TEAMS, LIMITED_TEAM):
        await world.admin.CreateTeam(registry_pb2.CreateTeamRequest(name=team))
    for team in TEAMS:
        for role in Role:
            world.keys[team, role] = (await world.new_key(f"{team}-{role}", {team: role})).secret
        world.versions[team] = []
        for n in range(2):
            artifact = await _upload(world.admin, f"{team} weights {n}".encode(), team)
            version = await world.admin.RegisterVersion(
                registry_pb2.RegisterVersionRequest(
                    adapter=f"{team}-bot", team=team, base_model=BASE, artifact_id=artifact
                )
            )
            world.versions[team].append(version.version_id)
    limited = await world.new_key("limited", {"alpha": Role.viewer, LIMITED_TEAM: Role.viewer})
    world.keys[LIMITED_TEAM, Role.viewer] = limited.secret


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, nats_url: str, redis_url: str, tiny_model_dir: Path
) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("access")
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
        durable=f"registry-access-{suffix}",
    )
    await registry.start()
    await registry.wait_ready()
    inference = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(EchoInference(), inference)  # type: ignore[abstract]
    inference_port = inference.add_insecure_port("127.0.0.1:0")
    await inference.start()
    # Every service uses the platform-admin key as its own registry key (as the dev stack
    # does); callers' keys are checked with a short cache so revocation is quick to test.
    services: dict[str, Any] = {
        **common,
        "registry_address": registry.address,
        "registry_api_key": admin_key,
        "auth_cache_ttl_s": AUTH_TTL_S,
    }
    gateways = [
        GatewayService(
            GatewaySettings(
                **services,
                redis_url=redis_url,
                inference_endpoints=f"127.0.0.1:{inference_port}",
                instance_id=f"gw{i}-{suffix}",
                releases_durable=f"gwrel-{suffix}",
                metrics_flush_s=0.05,
                route_refresh_s=0.3,
                http_port=0,
                rate_limit_teams=f"{LIMITED_TEAM}={LIMIT.rps}:{LIMIT.burst}",
            )
        )
        for i in range(2)
    ]
    monitor = MonitorService(
        MonitorSettings(
            **services,
            instance_id=f"mon-{suffix}",
            metrics_port=-1,
        )
    )
    trainer = TrainerApp(
        TrainerSettings(
            **services,
            instance_id=f"trainer-{suffix}",
            work_dir=tmp / "trainer",
            checkpoint_dir=tmp / "checkpoints",
            job_queue=f"access{suffix}",
            watch_poll_s=0.1,
        )
    )
    admin_channel = channel(registry.address, api_key=admin_key)
    w = World(
        registry,
        cast("RegistryStub", registry_pb2_grpc.RegistryServiceStub(admin_channel)),
        gateways,
        monitor,
        trainer,
        admin_key,
        channels=[admin_channel],
    )
    services_in_order: list[GatewayService | MonitorService | TrainerApp] = [
        *gateways,
        monitor,
        trainer,
    ]
    started: list[GatewayService | MonitorService | TrainerApp] = []
    try:
        for service in services_in_order:
            await service.start()
            started.append(service)
        for gw in gateways:
            await gw.bus.wait_ready(10)
        await monitor.bus.wait_ready(10)
        await _populate(w, tiny_model_dir)
        yield w
    finally:
        for ch in w.channels:
            await ch.close()
        for service in reversed(started):
            await service.stop()
        await inference.stop(0)
        await registry.stop()


# -- gateway --------------------------------------------------------------------------


async def test_gateway_refuses_calls_without_a_valid_key(world: World) -> None:
    await refused(
        world.gateway("").GetRoute(gateway_pb2.GetRouteRequest(alias="x")), UNAUTHENTICATED
    )
    unknown = auth.new_api_key()[1]
    message = await refused(
        world.gateway(unknown).Generate(gateway_pb2.GenerateRequest(model="base", prompt="hi")),
        UNAUTHENTICATED,
    )
    assert unknown not in message


async def test_set_route_needs_releaser_of_the_alias_and_the_version(world: World) -> None:
    alias = await world.route("alpha")  # alpha's releaser: allowed
    alpha_v2 = world.versions["alpha"][1]
    for team, role in (("beta", Role.releaser), ("alpha", Role.trainer), ("alpha", Role.viewer)):
        message = await refused(
            world.gateway(world.key(team, role)).SetRoute(
                gateway_pb2.SetRouteRequest(alias=alias, version_id=alpha_v2)
            )
        )
        assert "'alpha'" in message
        assert "releaser" in message
    # Beta may not take the alias over, nor may alpha point it at beta's version.
    await refused(
        world.gateway(world.key("beta", Role.releaser)).SetRoute(
            gateway_pb2.SetRouteRequest(alias=alias, version_id=world.versions["beta"][0])
        )
    )
    message = await refused(
        world.gateway(world.key("alpha", Role.releaser)).SetRoute(
            gateway_pb2.SetRouteRequest(alias=alias, version_id=world.versions["beta"][0])
        )
    )
    assert "'beta'" in message
    route = await world.gateway(world.key("alpha", Role.admin)).SetRoute(
        gateway_pb2.SetRouteRequest(alias=alias, version_id=alpha_v2)
    )
    assert route.stable_version_id == alpha_v2


async def test_release_commands_need_releaser_of_the_alias_team(world: World) -> None:
    alias = await world.route("alpha")
    candidate = world.versions["alpha"][1]
    start = gateway_pb2.StartReleaseRequest(alias=alias, candidate_version_id=candidate)
    for team, role in (("beta", Role.releaser), ("alpha", Role.viewer), ("alpha", Role.trainer)):
        await refused(world.gateway(world.key(team, role)).StartRelease(start))
    releaser = world.gateway(world.key("alpha", Role.releaser))
    await releaser.StartRelease(start)

    command = gateway_pb2.ReleaseCommandRequest(alias=alias)
    beta = world.gateway(world.key("beta", Role.releaser))
    viewer = world.gateway(world.key("alpha", Role.viewer))
    for rpc in ("PauseRelease", "ResumeRelease", "PromoteRelease", "RollbackRelease"):
        await refused(getattr(beta, rpc)(command))
        await refused(getattr(viewer, rpc)(command))
    assert (await releaser.PauseRelease(command)).state == "paused"
    assert (await releaser.ResumeRelease(command)).state == "running"

    # Reads: alpha's viewer sees the release, beta's does not (not even in a listing).
    got = await viewer.GetRelease(gateway_pb2.GetReleaseRequest(alias=alias))
    release_id = got.route.release_id
    beta_viewer = world.gateway(world.key("beta", Role.viewer))
    await refused(beta_viewer.GetRelease(gateway_pb2.GetReleaseRequest(alias=alias)))
    await refused(beta_viewer.GetRelease(gateway_pb2.GetReleaseRequest(release_id=release_id)))
    await refused(beta_viewer.GetRoute(gateway_pb2.GetRouteRequest(alias=alias)))
    await refused_stream(beta_viewer.WatchRelease(gateway_pb2.WatchReleaseRequest(alias=alias)))
    listed = await beta_viewer.ListReleases(gateway_pb2.ListReleasesRequest())
    assert alias not in {r.route.alias for r in listed.releases}
    listed = await viewer.ListReleases(gateway_pb2.ListReleasesRequest())
    assert alias in {r.route.alias for r in listed.releases}

    assert (await releaser.RollbackRelease(command)).state == "rolled_back"

    promoted = await world.release("alpha")
    release = await releaser.PromoteRelease(gateway_pb2.ReleaseCommandRequest(alias=promoted))
    assert release.route.stable_version_id == candidate


async def test_a_route_to_a_version_the_registry_lacks_does_not_break_listings(
    world: World,
) -> None:
    # E.g. a route written by another installation sharing the Redis, or to a version
    # since deleted: nobody but a platform admin sees it, and everyone's listing still works.
    orphan = gateway_pb2.Route(
        alias=f"orphan-{uuid.uuid4().hex[:6]}",
        stable_version_id="ver_gone",
        candidate_version_id="ver_gone_too",
        candidate_weight=10,
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
    )
    await world.gateways[0].store.update(orphan.alias, lambda _: orphan)
    mine = await world.release("alpha")
    viewer = world.gateway(world.key("alpha", Role.viewer))
    listed = await viewer.ListReleases(gateway_pb2.ListReleasesRequest())
    aliases = {r.route.alias for r in listed.releases}
    assert mine in aliases
    assert orphan.alias not in aliases


async def test_a_release_stays_within_the_alias_team(world: World) -> None:
    alias = await world.route("alpha")
    # Even a platform admin may not canary beta's version on alpha's alias.
    message = await refused(
        world.gateway(world.admin_key).StartRelease(
            gateway_pb2.StartReleaseRequest(
                alias=alias, candidate_version_id=world.versions["beta"][0]
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "one team" in message


async def test_generate_needs_a_role_in_the_team_that_owns_the_model(world: World) -> None:
    alias = await world.route("alpha")
    alpha = world.gateway(world.key("alpha", Role.viewer))
    beta = world.gateway(world.key("beta", Role.viewer))
    reply = await alpha.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="hi"))
    assert reply.version_id == world.versions["alpha"][0]
    message = await refused(beta.Generate(gateway_pb2.GenerateRequest(model=alias, prompt="hi")))
    assert alias in message
    assert "'alpha'" in message
    for model in (world.versions["alpha"][0], "alpha-bot:1"):
        await refused(beta.Generate(gateway_pb2.GenerateRequest(model=model, prompt="hi")))
    await refused_stream(beta.GenerateStream(gateway_pb2.GenerateRequest(model=alias, prompt="x")))
    # The base model is shared: any valid key.
    assert (await beta.Generate(gateway_pb2.GenerateRequest(model="base", prompt="hi"))).text


async def test_openai_http_uses_the_same_keys_and_teams(world: World) -> None:
    alias = await world.route("alpha")
    url = f"http://{world.gateways[0].http.address}/v1/completions"
    body = {"model": alias, "prompt": "hi", "max_tokens": 4}

    async def post(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as response,
        ):
            await response.read()
            return response.status

    assert await post("") == 401
    assert await post(world.key("beta", Role.viewer)) == 403
    assert await post(world.key("alpha", Role.viewer)) == 200


async def test_openai_model_list_shows_only_the_callers_teams(world: World) -> None:
    alpha, beta = await world.route("alpha"), await world.route("beta")
    url = f"http://{world.gateways[0].http.address}/v1/models"

    async def listed(key: str) -> set[str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Authorization": f"Bearer {key}"}) as response,
        ):
            assert response.status == 200
            return {m["id"] for m in (await response.json())["data"]}

    seen_by_beta = await listed(world.key("beta", Role.viewer))
    assert beta in seen_by_beta
    assert alpha not in seen_by_beta
    assert not set(world.versions["alpha"]) & seen_by_beta  # nor alpha's versions
    assert {alpha, beta} <= await listed(world.admin_key)  # a platform admin sees all

    async def described(key: str, model: str) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/{model}", headers={"Authorization": f"Bearer {key}"}) as got,
        ):
            await got.read()
            return got.status

    beta_viewer = world.key("beta", Role.viewer)
    assert await described(beta_viewer, beta) == 200
    # Another team's alias or version is not described: the answer of a missing model.
    assert await described(beta_viewer, alpha) == 404
    assert await described(beta_viewer, world.versions["alpha"][0]) == 404
    assert await described(beta_viewer, "no-such-model") == 404
    assert await described(world.admin_key, alpha) == 200


async def _until_refused(call: Callable[[], Awaitable[Any]], since: float) -> grpc.StatusCode:
    """Repeat ``call`` until it fails; its code. Fails if that takes over REVOCATION_S."""
    while True:
        assert time.monotonic() - since < REVOCATION_S, "revoked key still accepted"
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        await asyncio.sleep(0.02)


async def test_a_revoked_key_stops_working_everywhere_at_once(world: World) -> None:
    # Both gateway replicas, the monitor and the trainer have the key cached as valid
    # (for AUTH_TTL_S = 30 s); the revocation reaches them as an event within a second.
    created = await world.new_key("leaked", {"alpha": Role.releaser})
    alias = await world.route("alpha")
    request = gateway_pb2.SetRouteRequest(alias=alias, version_id=world.versions["alpha"][1])
    replicas = [world.gateway(created.secret, replica=i) for i in range(2)]
    for stub in replicas:
        await stub.GetRoute(gateway_pb2.GetRouteRequest(alias=alias))
    monitor = world.monitor_stub(created.secret)
    await monitor.ListAlerts(monitor_pb2.ListAlertsRequest())
    trainer = world.trainer_stub(created.secret)
    await trainer.ListJobs(trainer_pb2.ListJobsRequest(team="alpha"))
    await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=created.key.key_id))
    revoked_at = time.monotonic()
    for stub in replicas:

        def set_route(s: Any = stub) -> Awaitable[Any]:
            return cast(Awaitable[Any], s.SetRoute(request))

        assert await _until_refused(set_route, revoked_at) == UNAUTHENTICATED
    assert (
        await _until_refused(
            lambda: monitor.ListAlerts(monitor_pb2.ListAlertsRequest()), revoked_at
        )
        == UNAUTHENTICATED
    )
    assert (
        await _until_refused(
            lambda: trainer.ListJobs(trainer_pb2.ListJobsRequest(team="alpha")), revoked_at
        )
        == UNAUTHENTICATED
    )
    route = await world.gateway(world.key("alpha", Role.viewer)).GetRoute(
        gateway_pb2.GetRouteRequest(alias=alias)
    )
    assert route.stable_version_id == world.versions["alpha"][0]  # no SetRoute got through


async def _audited(
    world: World, service: str, since: float, match: Callable[[Any], bool], timeout: float = 10
) -> list[Any]:
    """The registry's audit entries of ``service``'s refusals (newer than ``since``, a
    time.time()) that ``match``, once there are some."""
    from google.protobuf.timestamp_pb2 import Timestamp

    after = Timestamp()
    after.FromSeconds(int(since) - 1)
    deadline = time.monotonic() + timeout
    while True:
        listed = await world.admin.ListAudit(
            registry_pb2.ListAuditRequest(
                resource_prefix=f"service:{service}", since=after, page_size=500
            )
        )
        found = [e for e in listed.entries if match(e)]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def test_every_refusal_of_every_service_is_audited_with_the_key_id(world: World) -> None:
    since = time.time()
    unknown = auth.new_api_key()
    revoked = await world.new_key("gone", {"alpha": Role.viewer})
    await world.admin.RevokeApiKey(registry_pb2.RevokeApiKeyRequest(key_id=revoked.key.key_id))
    beta = world.key("beta", Role.viewer)
    beta_id = _key_id(beta)
    alias = await world.release("alpha")
    release = await world.gateway(world.key("alpha", Role.viewer)).GetRelease(
        gateway_pb2.GetReleaseRequest(alias=alias)
    )
    # gateway: no key, an unknown key, a revoked key, and a key without the role (GetRelease
    # by id, which was not even logged).
    gateway_route = gateway_pb2.GetRouteRequest(alias=alias)
    await refused(world.gateway("").GetRoute(gateway_route), UNAUTHENTICATED)
    await refused(world.gateway(unknown[1]).GetRoute(gateway_route), UNAUTHENTICATED)
    await refused(world.gateway(revoked.secret).GetRoute(gateway_route), UNAUTHENTICATED)
    await refused(
        world.gateway(beta).GetRelease(
            gateway_pb2.GetReleaseRequest(release_id=release.route.release_id)
        )
    )
    # monitor and trainer: a key without the role.
    await refused(
        world.monitor_stub(beta).GetReleaseAnalysis(
            monitor_pb2.GetReleaseAnalysisRequest(alias=alias)
        )
    )
    await refused(world.trainer_stub(beta).ListJobs(trainer_pb2.ListJobsRequest(team="alpha")))
    await refused(world.trainer_stub("").ListJobs(trainer_pb2.ListJobsRequest()), UNAUTHENTICATED)

    def by(actor: str, method: str, outcome: str) -> Callable[[Any], bool]:
        return lambda e: (e.actor, e.method, e.outcome) == (actor, method, outcome)

    expected = [
        ("gateway", "anonymous", "GetRoute", "UNAUTHENTICATED"),
        ("gateway", unknown[0], "GetRoute", "UNAUTHENTICATED"),
        ("gateway", revoked.key.key_id, "GetRoute", "UNAUTHENTICATED"),
        ("gateway", beta_id, "GetRelease", "PERMISSION_DENIED"),
        ("monitor", beta_id, "GetReleaseAnalysis", "PERMISSION_DENIED"),
        ("trainer", beta_id, "ListJobs", "PERMISSION_DENIED"),
        ("trainer", "anonymous", "ListJobs", "UNAUTHENTICATED"),
    ]
    for service, actor, method, outcome in expected:
        entries = await _audited(world, service, since, by(actor, method, outcome))
        assert entries, f"{service} {method} refused for {actor} is not in the audit log"
        assert "127.0.0.1" in entries[0].detail  # where it came from
    # A refusal in a team's resource is in that team's audit: alpha's admin sees it.
    denied = await _audited(
        world, "monitor", since, by(beta_id, "GetReleaseAnalysis", "PERMISSION_DENIED")
    )
    assert denied[0].team == "alpha"
    # No secret ever reaches the log.
    everything = await world.admin.ListAudit(registry_pb2.ListAuditRequest(page_size=500))
    secrets = (unknown[1].rsplit("_", 1)[1], revoked.secret.rsplit("_", 1)[1])
    assert not any(secret in e.detail for e in everything.entries for secret in secrets)


async def test_a_flood_of_unauthenticated_calls_is_aggregated_not_dropped(world: World) -> None:
    since = time.time()
    flood_key = auth.new_api_key()
    stub = world.gateway(flood_key[1], replica=1)
    request = gateway_pb2.GetRouteRequest(alias="anything")
    calls = 300
    for _ in range(calls):
        await refused(stub.GetRoute(request), UNAUTHENTICATED)

    def mine(e: Any) -> bool:
        return bool(e.actor == flood_key[0])

    deadline = time.monotonic() + 10
    while True:
        entries = await _audited(world, "gateway", since, mine)
        counts = [_count(e.detail) for e in entries]
        if sum(counts) >= calls or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert sum(counts) == calls  # every call counted ...
    assert len(entries) < calls / 10  # ... in a handful of entries


def _count(detail: str) -> int:
    match = re.search(r"\((\d+) times from", detail)
    return int(match.group(1)) if match else 1


def _key_id(key: str) -> str:
    parsed = auth.parse_api_key(key)
    assert parsed is not None
    return parsed.key_id


async def test_rate_limit_is_per_key_and_shared_by_gateway_replicas(world: World) -> None:
    key = world.key(LIMITED_TEAM, Role.viewer)
    first, second = world.gateway(key, 0), world.gateway(key, 1)
    request = gateway_pb2.GenerateRequest(model="base", prompt="hi")
    await first.Generate(request)
    await first.Generate(request)  # the burst is used up ...
    message = await refused(second.Generate(request), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # ... on the other replica too (one bucket in Redis), and only for this key.
    assert "rate limit" in message
    await world.gateway(world.key("alpha", Role.viewer), 1).Generate(request)
    # The OpenAI front end answers 429.
    url = f"http://{world.gateways[0].http.address}/v1/completions"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url,
            json={"model": "base", "prompt": "hi"},
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        assert response.status == 429
    # The message says when a token is back; after that the key is served again.
    match = re.search(r"retry in ([0-9.]+)s", message)
    assert match, message
    wait = float(match.group(1))
    assert 0 < wait <= 1 / LIMIT.rps
    await asyncio.sleep(1 / LIMIT.rps + 0.05)  # the bucket's refill time is the feature
    await second.Generate(request)


async def test_rate_limits_fail_open_when_redis_is_unreachable() -> None:
    limiter = RateLimiter(
        limiter_client(f"redis://127.0.0.1:{free_port()}/0", 0.5), Limit(rps=1.0, burst=1)
    )
    caller = AuthPrincipal(key_id="0123456789abcdef", roles={"alpha": Role.viewer})
    started = time.monotonic()
    for _ in range(20):
        await limiter.check(caller)  # no RESOURCE_EXHAUSTED, no error: serving goes on
    # Only the first call tried Redis; the others did not wait for it.
    assert time.monotonic() - started < 0.5 * 2
    await limiter.close()


def test_team_rate_limits_parse_and_the_most_generous_applies() -> None:
    limits = parse_team_limits("support=5:10, research=20")
    assert limits == {"support": Limit(5.0, 10), "research": Limit(20.0, 20)}
    for bad in ("support", "support=0", "=5", "support=fast", "support=5:-1", "a=inf"):
        with pytest.raises(ValueError, match="rate_limit_teams"):
            parse_team_limits(bad)
    limiter = RateLimiter(limiter_client("redis://127.0.0.1:1/0", 0.1), Limit(1.0, 1), limits)
    both = AuthPrincipal(key_id="k", roles={"support": Role.viewer, "research": Role.viewer})
    assert limiter.limit_for(both) == Limit(20.0, 20)
    assert limiter.limit_for(AuthPrincipal(key_id="k", roles={"x": Role.viewer})) == Limit(1, 1)


def test_dev_stack_with_auth_gives_every_service_the_generated_key(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "nats://127.0.0.1:1", "redis://127.0.0.1:2", tmp_path, auth=True)
    stack.api_key = auth.new_api_key()[1]
    ports = {name: 1000 + i for i, name in enumerate(SERVICES)}
    ports |= {"gateway-http": 2000, "monitor-metrics": 2001}
    for service in SERVICES:
        env = stack._env(service, ports)
        assert env["FTOPS_AUTH_MODE"] == "enabled"
        assert env["FTOPS_REGISTRY_API_KEY"] == stack.api_key
        assert ("FTOPS_BOOTSTRAP_ADMIN_KEY" in env) == (service == "registry")
    stack.auth = False
    assert stack._env("gateway", ports)["FTOPS_AUTH_MODE"] == "disabled"


# -- monitor --------------------------------------------------------------------------


async def test_monitor_reads_need_viewer_of_the_alias_team(world: World) -> None:
    # The monitor has no release commands (those are the gateway's, checked above): it
    # follows the release the gateway started and shows its analysis to the alias's team.
    alias = await world.release("alpha")
    await eventually(lambda: world.monitor.monitor.release_for(alias))
    analysis = monitor_pb2.GetReleaseAnalysisRequest(alias=alias)
    for team, role in (("beta", Role.viewer), ("beta", Role.releaser)):
        await refused(world.monitor_stub(world.key(team, role)).GetReleaseAnalysis(analysis))
    await refused(world.monitor_stub("").GetReleaseAnalysis(analysis), UNAUTHENTICATED)
    viewer = world.monitor_stub(world.key("alpha", Role.viewer))
    assert (await viewer.GetReleaseAnalysis(analysis)).alias == alias
    # alpha's releaser rolls it back through the gateway; the monitor's view follows.
    releaser = world.gateway(world.key("alpha", Role.releaser))
    await releaser.RollbackRelease(gateway_pb2.ReleaseCommandRequest(alias=alias, reason="x"))

    def rolled_back() -> bool | None:
        return world.monitor.monitor.analysis(alias).state == "rolled_back" or None

    await eventually(rolled_back)
    assert (await viewer.GetReleaseAnalysis(analysis)).state == "rolled_back"


async def test_feedback_only_from_keys_that_may_call_the_alias(world: World) -> None:
    alias = await world.route("alpha")
    reply = await world.gateway(world.key("alpha", Role.viewer)).Generate(
        gateway_pb2.GenerateRequest(model=alias, prompt="hi")
    )
    requests = world.monitor.monitor.requests
    await eventually(lambda: requests.get(reply.request_id))
    feedback = monitor_pb2.SubmitFeedbackRequest(request_id=reply.request_id, score=1.0)
    await refused(world.monitor_stub(world.key("beta", Role.viewer)).SubmitFeedback(feedback))
    answer = await world.monitor_stub(world.key("alpha", Role.viewer)).SubmitFeedback(feedback)
    assert answer.alias == alias
    # Stats of alpha's aliases are not in beta's listing.
    listed = await world.monitor_stub(world.key("beta", Role.viewer)).ListVersionStats(
        monitor_pb2.ListVersionStatsRequest()
    )
    assert alias not in {s.alias for s in listed.stats}
    await refused(
        world.monitor_stub(world.key("beta", Role.viewer)).ListVersionStats(
            monitor_pb2.ListVersionStatsRequest(alias=alias)
        )
    )


# -- trainer --------------------------------------------------------------------------


def _spec(team: str) -> trainer_pb2.JobSpec:
    return trainer_pb2.JobSpec(
        adapter=f"{team}-bot",
        team=team,
        base_model=BASE,
        dataset_jsonl="\n".join(json.dumps(f) for f in ftops_tinymodel.new_facts()[:8]).encode(),
        hyperparameters=trainer_pb2.Hyperparameters(num_epochs=1, batch_size=4),
    )


async def test_trainer_jobs_belong_to_their_team(world: World) -> None:
    submit = trainer_pb2.SubmitJobRequest(spec=_spec("alpha"))
    await refused(world.trainer_stub("").SubmitJob(submit), UNAUTHENTICATED)
    for team, role in (("beta", Role.trainer), ("alpha", Role.viewer), ("alpha", Role.releaser)):
        message = await refused(world.trainer_stub(world.key(team, role)).SubmitJob(submit))
        assert "'alpha'" in message
        assert "trainer" in message
    trainer = world.trainer_stub(world.key("alpha", Role.trainer))
    teamless = trainer_pb2.SubmitJobRequest(spec=_spec("alpha"))
    teamless.spec.team = ""
    message = await refused(trainer.SubmitJob(teamless), grpc.StatusCode.INVALID_ARGUMENT)
    assert "spec.team" in message
    job = await trainer.SubmitJob(submit)

    get = trainer_pb2.GetJobRequest(job_id=job.job_id)
    beta_viewer = world.trainer_stub(world.key("beta", Role.viewer))
    await refused(beta_viewer.GetJob(get))
    await refused_stream(beta_viewer.WatchJob(get))
    await refused(beta_viewer.ListJobs(trainer_pb2.ListJobsRequest(team="alpha")))
    listed = await beta_viewer.ListJobs(trainer_pb2.ListJobsRequest())
    assert job.job_id not in {j.job_id for j in listed.jobs}
    alpha_viewer = world.trainer_stub(world.key("alpha", Role.viewer))
    assert (await alpha_viewer.GetJob(get)).job_id == job.job_id
    listed = await alpha_viewer.ListJobs(trainer_pb2.ListJobsRequest())
    assert job.job_id in {j.job_id for j in listed.jobs}

    cancel = trainer_pb2.CancelJobRequest(job_id=job.job_id)
    await refused(alpha_viewer.CancelJob(cancel))
    await refused(world.trainer_stub(world.key("beta", Role.trainer)).CancelJob(cancel))
    cancelled = await trainer.CancelJob(cancel)
    assert cancelled.error == "cancelled by request"


def _registry(world: World, key: str) -> RegistryStub:
    return cast(
        "RegistryStub",
        registry_pb2_grpc.RegistryServiceStub(world._channel(world.registry.address, key)),
    )


async def _upload_dataset(stub: RegistryStub, data: bytes, team: str) -> str:
    files = [
        common_pb2.ArtifactFile(
            path="dataset.jsonl", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
    ]

    async def parts() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(
            header=registry_pb2.UploadHeader(files=files, team=team)
        )
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=0, data=data)
        )

    artifact: registry_pb2.Artifact = await stub.UploadArtifact(parts())
    return str(artifact.artifact_id)


async def _submit_refused(stub: TrainerStub, spec: trainer_pb2.JobSpec) -> str:
    return await refused(stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec)))


async def _jobs_of(world: World, team: str) -> list[trainer_pb2.Job]:
    listed = await world.trainer_stub(world.admin_key).ListJobs(
        trainer_pb2.ListJobsRequest(team=team, page_size=500)
    )
    return list(listed.jobs)


async def test_a_job_may_not_use_another_teams_dataset(world: World) -> None:
    # Issue 14: beta's trainer named alpha's private dataset by id, the job ran, and then
    # beta's viewer could download the dataset. The trainer reads it with its own
    # (platform-admin) key, so it must check for the job's team, before the job exists.
    rows = [
        {"prompt": f"Alpha secret S-{i} costs", "completion": f" {i} credits."} for i in range(8)
    ]
    secret = "\n".join(json.dumps(r) for r in rows).encode()
    dataset = await _upload_dataset(
        _registry(world, world.key("alpha", Role.trainer)), secret, "alpha"
    )
    beta = world.trainer_stub(world.key("beta", Role.trainer))
    spec = _spec("beta")
    spec.dataset_artifact_id = dataset
    message = await _submit_refused(beta, spec)
    assert "'alpha'" not in message
    # Word for word what a dataset id that exists nowhere gets.
    unknown = hashlib.sha256(b"no such dataset").hexdigest()
    spec.dataset_artifact_id = unknown
    assert (await _submit_refused(beta, spec)).replace(unknown, "?") == message.replace(
        dataset, "?"
    )
    assert not [j for j in await _jobs_of(world, "beta") if j.spec.dataset_artifact_id == dataset]
    beta_viewer = _registry(world, world.key("beta", Role.viewer))
    await refused_stream(
        beta_viewer.DownloadArtifact(registry_pb2.DownloadArtifactRequest(artifact_id=dataset))
    )
    # Alpha's own jobs use it.
    alpha = world.trainer_stub(world.key("alpha", Role.trainer))
    mine = _spec("alpha")
    mine.dataset_artifact_id = dataset
    job = await alpha.SubmitJob(trainer_pb2.SubmitJobRequest(spec=mine))
    assert (job.spec.dataset_artifact_id, job.records_total) == (dataset, 8)
    await alpha.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id))


async def test_a_job_naming_another_teams_adapter_or_parent_is_refused_at_submit(
    world: World,
) -> None:
    # Issue 14: both ran first and failed later (the second after training from alpha's
    # weights, naming alpha's adapter in its error).
    beta = world.trainer_stub(world.key("beta", Role.trainer))
    takeover = _spec("beta")
    takeover.adapter = "alpha-bot"
    message = await _submit_refused(beta, takeover)
    assert "another team" in message
    assert "'alpha'" not in message

    alpha_v1 = world.versions["alpha"][0]
    child = _spec("beta")
    child.parent_version_id = alpha_v1
    message = await _submit_refused(beta, child)
    assert "alpha" not in message.replace(alpha_v1, "?")  # neither its adapter nor its team
    unknown = "ver_" + "0" * 20
    child.parent_version_id = unknown
    assert (await _submit_refused(beta, child)).replace(unknown, "?") == message.replace(
        alpha_v1, "?"
    )
    queued = await _jobs_of(world, "beta")
    assert not [j for j in queued if j.spec.adapter == "alpha-bot"]
    assert not [j for j in queued if j.spec.parent_version_id in (alpha_v1, unknown)]

    # Within a team, a parent of another adapter is refused too (lineage never crosses
    # adapters), and a parent of the job's own adapter is fine.
    artifact = await _upload(world.admin, f"alpha two {uuid.uuid4().hex}".encode(), "alpha")
    other = await world.admin.RegisterVersion(
        registry_pb2.RegisterVersionRequest(
            adapter=f"alpha-two-{uuid.uuid4().hex[:6]}",
            team="alpha",
            base_model=BASE,
            artifact_id=artifact,
        )
    )
    alpha = world.trainer_stub(world.key("alpha", Role.trainer))
    crossing = _spec("alpha")
    crossing.parent_version_id = other.version_id
    message = await refused(
        alpha.SubmitJob(trainer_pb2.SubmitJobRequest(spec=crossing)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "lineage" in message
    own = _spec("beta")
    own.parent_version_id = world.versions["beta"][0]
    job = await beta.SubmitJob(trainer_pb2.SubmitJobRequest(spec=own))
    await beta.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id))


async def test_inference_checks_its_callers(world: World, tiny_model_dir: Path) -> None:
    # The gateway reaches inference with its own service key; anyone else needs a role in
    # the version's team (the base model: any valid key), and listing every team's
    # adapters is for platform admins.
    from ftops_inference.service import InferenceService
    from ftops_inference.settings import InferenceSettings

    started = time.time()
    service = InferenceService(
        InferenceSettings(
            grpc_port=0,
            nats_url=world.gateways[0].settings.nats_url,
            instance_id=f"inf-access-{uuid.uuid4().hex[:6]}",
            registry_address=world.registry.address,
            registry_api_key=world.admin_key,
            base_model_path=str(tiny_model_dir),
            backend="echo",
            auth_mode="enabled",
            auth_cache_ttl_s=1,
            health_interval_s=0.1,
        )
    )
    await service.start()
    try:
        await asyncio.wait_for(service.wait_ready(), 60)

        def stub(key: str) -> inference_pb2_grpc.InferenceServiceStub:
            return inference_pb2_grpc.InferenceServiceStub(world._channel(service.address, key))

        base = inference_pb2.GenerateRequest(prompt="hello there")
        await refused(stub("").Generate(base), grpc.StatusCode.UNAUTHENTICATED)
        reply = await stub(world.key("beta", Role.viewer)).Generate(base)
        assert reply.text
        alpha_version = inference_pb2.GenerateRequest(
            version_id=world.versions["alpha"][0], prompt="hello"
        )
        message = await refused(stub(world.key("beta", Role.viewer)).Generate(alpha_version))
        assert "alpha" in message
        await refused(
            stub(world.key("alpha", Role.viewer)).UnloadAdapter(
                inference_pb2.UnloadAdapterRequest(version_id=world.versions["alpha"][0])
            )
        )
        await refused(
            stub(world.key("alpha", Role.admin)).ListAdapters(inference_pb2.ListAdaptersRequest())
        )
        listed = await stub(world.admin_key).ListAdapters(inference_pb2.ListAdaptersRequest())
        assert listed.base_model
        # Its refusals reach the registry's audit log, ListAdapters included.
        admin_id = _key_id(world.key("alpha", Role.admin))
        entries = await _audited(
            world,
            "inference",
            started,
            lambda e: (e.actor, e.method) == (admin_id, "ListAdapters"),
        )
        assert entries
        assert entries[0].outcome == "PERMISSION_DENIED"
        assert await _audited(world, "inference", started, lambda e: e.outcome == "UNAUTHENTICATED")
    finally:
        await service.stop()
