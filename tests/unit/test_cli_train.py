"""``ftops train`` (routing a new adapter's first version, the gate's hint, max-steps that do
not bind), ``ftops versions``' state, ``release start``'s defaults, the last frame of
``release watch`` and a closed stdout, against real gRPC servers (in a thread, with scripted
answers)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from typer.testing import CliRunner, Result

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.monitor.v1 import monitor_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from ftops_cli.app import app
from ftops_cli.errors import EXIT_JOB_FAILED, EXIT_USAGE
from ftops_cli.releases import final_analysis
from ftops_client import FtopsClient, FtopsClientError

GATE_ERROR = "evaluation gate: retention 0.857 < 0.950 on 64 held-out records"


class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Jobs of adapter "rejected-bot" are rejected by the gate; every job has 80 steps."""

    def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.Job:
        return trainer_pb2.Job(
            job_id=f"job_{request.spec.adapter}",
            spec=request.spec,
            state=events_pb2.JOB_STATE_QUEUED,
        )

    def WatchJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.Job]:
        adapter = request.job_id.removeprefix("job_")
        job = trainer_pb2.Job(
            job_id=request.job_id,
            spec=trainer_pb2.JobSpec(adapter=adapter),
            state=events_pb2.JOB_STATE_RUNNING,
            step=1,
            total_steps=80,
        )
        yield job
        job.step = 80
        if adapter == "rejected-bot":
            job.state, job.error = events_pb2.JOB_STATE_REJECTED, GATE_ERROR
        else:
            job.state, job.version_id, job.version_number = (
                events_pb2.JOB_STATE_SUCCEEDED,
                f"ver_{adapter}",
                1,
            )
        yield job


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Alias "routed-bot" has a route; SetRoute on "denied-bot" is refused."""

    def __init__(self) -> None:
        self.set_routes: list[tuple[str, str]] = []

    def GetRoute(
        self, request: gateway_pb2.GetRouteRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Route:
        if request.alias != "routed-bot":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no route for alias {request.alias!r}")
        return gateway_pb2.Route(alias=request.alias, stable_version_id="ver_old")

    def SetRoute(
        self, request: gateway_pb2.SetRouteRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Route:
        if request.alias == "denied-bot":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "releaser role needed")
        self.set_routes.append((request.alias, request.version_id))
        return gateway_pb2.Route(alias=request.alias, stable_version_id=request.version_id)

    def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.GenerateChunk]:
        for word in ("one", " two", " three"):
            yield gateway_pb2.GenerateChunk(request_id="req_1", version_id="ver_1", text=word)


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListVersionsResponse:
        return registry_pb2.ListVersionsResponse(
            versions=[
                registry_pb2.Version(version_id="ver_a", number=1, state="ready"),
                registry_pb2.Version(version_id="ver_b", number=2, state="rejected"),
                registry_pb2.Version(version_id="ver_c", number=3, state="ready", archived=True),
            ]
        )


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, Gateway]]:
    gateway = Gateway()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(Trainer(), server)  # type: ignore[abstract]
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(Registry(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", gateway
    finally:
        server.stop(grace=None)


def _overrides(address: str) -> list[str]:
    return [f"--{s}={address}" for s in ("gateway", "trainer", "registry", "monitor")]


def _cli(address: str, *argv: str) -> Result:
    return CliRunner().invoke(app, [*_overrides(address), *argv], env={"COLUMNS": "200"})


def _train(address: str, tmp_path: Path, adapter: str, *flags: str) -> Result:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return _cli(address, "train", "--adapter", adapter, "--data", str(data), *flags, "-o", "json")


def test_a_new_adapters_first_ready_version_is_routed(servers: Any, tmp_path: Path) -> None:
    address, gateway = servers
    result = _train(address, tmp_path, "new-bot")
    assert result.exit_code == 0, result.output
    assert ("new-bot", "ver_new-bot") in gateway.set_routes
    assert "route new-bot → ver_new-bot" in result.stderr
    assert json.loads(result.stdout)["versionId"] == "ver_new-bot"  # stdout stays JSON


def test_an_existing_route_is_left_alone_and_the_release_command_shown(
    servers: Any, tmp_path: Path
) -> None:
    address, gateway = servers
    result = _train(address, tmp_path, "routed-bot")
    assert result.exit_code == 0, result.output
    assert not [r for r in gateway.set_routes if r[0] == "routed-bot"]
    assert "ftops release start routed-bot ver_routed-bot" in result.stderr


def test_no_route_flag_and_a_refused_route_keep_the_job_a_success(
    servers: Any, tmp_path: Path
) -> None:
    address, gateway = servers
    skipped = _train(address, tmp_path, "quiet-bot", "--no-route")
    assert skipped.exit_code == 0, skipped.output
    assert not [r for r in gateway.set_routes if r[0] == "quiet-bot"]
    denied = _train(address, tmp_path, "denied-bot")
    assert denied.exit_code == 0, denied.output
    assert "ftops route set denied-bot ver_denied-bot" in denied.stderr


def test_a_gate_rejection_says_where_the_gate_is_seen_and_changed(
    servers: Any, tmp_path: Path
) -> None:
    address, _ = servers
    result = _train(address, tmp_path, "rejected-bot")
    assert result.exit_code == EXIT_JOB_FAILED
    line = result.stderr.strip().splitlines()[-1]
    assert GATE_ERROR in line
    assert "ftops jobs get job_rejected-bot" in line
    assert "--min-retention" in line


def test_max_steps_the_epochs_cut_short_is_reported(servers: Any, tmp_path: Path) -> None:
    address, _ = servers
    short = _train(address, tmp_path, "steps-bot", "--max-steps", "200")
    assert short.exit_code == 0, short.output
    assert "trains 80 steps, not max_steps 200" in short.stderr
    assert "--num-epochs" in short.stderr
    binding = _train(address, tmp_path, "steps-bot", "--max-steps", "50")
    assert "not max_steps" not in binding.stderr


def test_target_modules_flag_names_the_modules_to_adapt(servers: Any, tmp_path: Path) -> None:
    address, _ = servers
    result = _train(
        address, tmp_path, "phi-bot", "--target-modules", "qkv_proj, o_proj", "--no-wait"
    )
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)["spec"]
    assert spec["lora"]["targetModules"] == ["qkv_proj", "o_proj"]
    default = _train(address, tmp_path, "llama-bot", "--no-wait")
    assert "targetModules" not in json.loads(default.stdout)["spec"].get("lora", {})


def test_train_without_data_names_the_data_flag(servers: Any) -> None:
    address, _ = servers
    result = _cli(address, "train", "--adapter", "bot")
    assert result.exit_code == EXIT_USAGE
    assert "missing 'dataset' (--data or 'dataset:' in --spec)" in result.stderr


def test_versions_table_shows_each_versions_state(servers: Any) -> None:
    address, _ = servers
    result = _cli(address, "versions", "bot")
    assert result.exit_code == 0, result.output
    rows = {
        line.split("│")[2].strip(): line for line in result.stdout.splitlines() if "ver_" in line
    }
    assert "│ ready " in rows["ver_a"]
    assert "│ rejected " in rows["ver_b"]
    assert "│ ready, archived " in rows["ver_c"]


def test_release_start_analysis_defaults_read_as_the_services(servers: Any) -> None:
    address, _ = servers
    result = _cli(address, "release", "start", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "[default: 0.0]" not in text
    assert "[default: 0]" not in text
    assert text.count("service default") == 6  # the analysis options whose 0 is the monitor's


def test_generate_into_a_closed_pipe_exits_quietly(servers: Any) -> None:
    """`ftops generate ... -o json | head -1`: the reader leaves; no error, exit 0."""
    address, _ = servers
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first chunk
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ftops_cli",
                *_overrides(address),
                "generate",
                "bot",
                "hi",
                "-o",
                "json",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


class _Analyses:
    """A client whose monitor learns of the release's end after a few polls."""

    def __init__(self, states: list[str], release_id: str = "rel_1") -> None:
        self.states = states
        self.release_id = release_id

    async def release_analysis(self, alias: str) -> monitor_pb2.ReleaseAnalysis:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return monitor_pb2.ReleaseAnalysis(alias=alias, release_id=self.release_id, state=state)


def _ended(state: str) -> gateway_pb2.Release:
    return gateway_pb2.Release(
        route=gateway_pb2.Route(alias="bot", release_id="rel_1"), state=state
    )


def test_release_watch_last_frame_waits_for_the_monitor_to_see_the_end() -> None:
    client = cast(FtopsClient, _Analyses(["running", "running", "rolled_back"]))
    final = asyncio.run(final_analysis(client, "bot", _ended("rolled_back")))
    assert final is not None
    assert final.state == "rolled_back"
    # A monitor that never catches up, or is on another release: no stale figures.
    stale = cast(FtopsClient, _Analyses(["running"]))
    assert asyncio.run(final_analysis(stale, "bot", _ended("promoted"), wait=0.3)) is None
    other = cast(FtopsClient, _Analyses(["running"], release_id="rel_2"))
    assert asyncio.run(final_analysis(other, "bot", _ended("promoted"))) is None


def test_release_watch_last_frame_without_a_monitor_is_none() -> None:
    class Down:
        async def release_analysis(self, alias: str) -> monitor_pb2.ReleaseAnalysis:
            raise FtopsClientError(
                "UNAVAILABLE", "down", "127.0.0.1:1", "monitor", unreachable=True
            )

    assert asyncio.run(final_analysis(cast(FtopsClient, Down()), "bot", _ended("promoted"))) is None
