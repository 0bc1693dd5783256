"""generate/feedback/alerts/stats and release status against a real gRPC server (in a
thread, with scripted answers): what reaches the server, what is printed, exit codes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from ftops_cli.app import app
from ftops_cli.errors import (
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

ANALYSIS = monitor_pb2.ReleaseAnalysis(
    alias="bot",
    release_id="rel_1",
    state="running",
    strategy="canary",
    step_index=1,
    weight=25,
    stable=monitor_pb2.VersionStats(version_id="ver_1", requests=120, error_rate=0.01),
    candidate=monitor_pb2.VersionStats(
        version_id="ver_2", requests=40, error_rate=0.0, feedback_count=3, feedback_mean=0.75
    ),
    figures={"p_errors": 0.0312, "latency_ratio": 1.04},
    checks=[
        monitor_pb2.Check(name="errors", status="pass", detail="0/40 vs 1/120"),
        monitor_pb2.Check(name="feedback", status="pending", detail="3 of 10 scores"),
    ],
    verdict="pass",
    last_decision="promote",
    last_reason="errors and latency within bounds",
)


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.requests: list[gateway_pb2.GenerateRequest] = []

    def GenerateStream(
        self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.GenerateChunk]:
        self.requests.append(request)
        if request.model == "draining":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no replica has ver_9 loaded")
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' is unknown")
        if request.model == "instruct" and not request.messages:
            # An instruct model asked without its chat template: ends at once.
            yield gateway_pb2.GenerateChunk(
                request_id="req_8", finish_reason=common_pb2.FINISH_REASON_EOS
            )
            return
        for i, piece in enumerate(("Hello", ",", " world")):
            done = i == 2
            yield gateway_pb2.GenerateChunk(
                request_id="req_7" if i == 0 else "",
                version_id="ver_2",
                arm="candidate",
                text=piece,
                completion_tokens=i + 1,
                finish_reason=(
                    common_pb2.FINISH_REASON_LENGTH
                    if done
                    else common_pb2.FINISH_REASON_UNSPECIFIED
                ),
            )

    def GetRoute(
        self, request: gateway_pb2.GetRouteRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Route:
        if request.alias != "bot":
            context.abort(grpc.StatusCode.NOT_FOUND, f"alias {request.alias!r} has no route")
        return gateway_pb2.Route(alias="bot", stable_version_id="ver_1")

    def WatchRelease(
        self, request: gateway_pb2.WatchReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.Release]:
        # The alias names how the scripted release ends: "rolled_back-bot", "promoted-bot".
        end = request.alias.split("-")[0]
        route = gateway_pb2.Route(
            alias=request.alias,
            release_id="rel_9",
            stable_version_id="ver_1",
            candidate_version_id="ver_2",
            release_stable_version_id="ver_1",
            release_candidate_version_id="ver_2",
            candidate_weight=10,
            steps=[10, 100],
        )
        yield gateway_pb2.Release(route=route, state="running")
        route.last_decision.kind = "rollback" if end == "rolled_back" else "promote"
        route.last_decision.reason = "candidate error rate 0.31 > 0.05"
        yield gateway_pb2.Release(route=route, state=end)

    def PromoteRelease(
        self, request: gateway_pb2.ReleaseCommandRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Release:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bot has no running release")
        raise AssertionError("unreachable")


class Monitor(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self) -> None:
        self.feedback: list[monitor_pb2.SubmitFeedbackRequest] = []

    def SubmitFeedback(
        self, request: monitor_pb2.SubmitFeedbackRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.SubmitFeedbackResponse:
        if request.request_id != "req_7":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no result for {request.request_id}")
        replaced = any(f.request_id == request.request_id for f in self.feedback)
        self.feedback.append(request)
        return monitor_pb2.SubmitFeedbackResponse(
            request_id=request.request_id,
            alias="bot",
            version_id="ver_2",
            arm="candidate",
            replaced=replaced,
        )

    def ListAlerts(
        self, request: monitor_pb2.ListAlertsRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.ListAlertsResponse:
        if request.alias == "quiet":
            return monitor_pb2.ListAlertsResponse()
        alert = events_pb2.Alert(
            rule="error_rate",
            alias="bot",
            version_id="ver_2",
            state="firing",
            value=0.2,
            threshold=0.05,
            message="ver_2 fails 20% of requests",
            for_seconds=65,
        )
        return monitor_pb2.ListAlertsResponse(alerts=[alert])

    def ListVersionStats(
        self, request: monitor_pb2.ListVersionStatsRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.ListVersionStatsResponse:
        stats = monitor_pb2.VersionStats(
            alias="bot", version_id="ver_1", requests=12, latency_p95_ms=41.5, window_seconds=300
        )
        return monitor_pb2.ListVersionStatsResponse(stats=[stats] if not request.alias else [])

    def GetReleaseAnalysis(
        self, request: monitor_pb2.GetReleaseAnalysisRequest, context: grpc.ServicerContext
    ) -> monitor_pb2.ReleaseAnalysis:
        return ANALYSIS


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, Gateway, Monitor]]:
    # Only the RPCs the CLI commands under test call are scripted.
    gateway, monitor = Gateway(), Monitor()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(monitor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", gateway, monitor
    finally:
        server.stop(grace=None)


def _cli(address: str, *argv: str) -> Result:
    overrides = [f"--{s}={address}" for s in ("gateway", "trainer", "registry", "monitor")]
    # Wide enough that Rich tables do not fold the cells the tests look for.
    return CliRunner().invoke(app, [*overrides, *argv], env={"COLUMNS": "200"})


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_generate_streams_text_and_names_the_request(servers: Any) -> None:
    address, gateway, _ = servers
    result = _cli(
        address,
        "generate",
        "bot",
        "Say hi",
        "--max-tokens=3",
        "--temperature=0.7",
        "--top-p=0.9",
        "--top-k=40",
        "--seed=5",
        "--stop=\n\n",
        "--user=u1",
        "--tenant=acme",
        "--meta",
        "team=support",
        "--meta",
        "plan=pro",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello, world\n"
    assert result.stderr.strip() == (
        "request req_7 · ver_2 (candidate) · 3 tokens · finished: length"
    )
    sent = gateway.requests[-1]
    assert (sent.model, sent.prompt, sent.user, sent.tenant) == ("bot", "Say hi", "u1", "acme")
    assert dict(sent.metadata) == {"team": "support", "plan": "pro"}
    sampling = sent.sampling
    assert (sampling.max_tokens, sampling.top_k, sampling.seed) == (3, 40, 5)
    assert sampling.temperature == pytest.approx(0.7)
    assert sampling.top_p == pytest.approx(0.9)
    assert list(sampling.stop) == ["\n\n"]


def test_generate_json_is_one_object_per_chunk(servers: Any) -> None:
    address, _, _ = servers
    result = _cli(address, "generate", "bot", "Say hi", "-o", "json")
    assert result.exit_code == 0, result.output
    chunks = [json.loads(line) for line in result.stdout.splitlines()]
    assert "".join(c["text"] for c in chunks) == "Hello, world"
    assert chunks[0]["requestId"] == "req_7"
    assert chunks[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert result.stderr == ""


def test_generate_reads_the_prompt_from_stdin(servers: Any) -> None:
    address, gateway, _ = servers
    overrides = [f"--gateway={address}"]
    result = CliRunner().invoke(
        app, [*overrides, "generate", "bot", "-"], input="A long prompt\nover two lines\n"
    )
    assert result.exit_code == 0, result.output
    assert gateway.requests[-1].prompt == "A long prompt\nover two lines\n"
    empty = CliRunner().invoke(app, [*overrides, "generate", "bot", "-"], input="  \n")
    assert empty.exit_code == EXIT_USAGE
    assert _one_error_line(empty) == "error: the prompt is empty"


def test_generate_chat_sends_messages_for_the_chat_template(servers: Any) -> None:
    address, gateway, _ = servers
    result = _cli(address, "generate", "instruct", "How much?", "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    sent = gateway.requests[-1]
    assert sent.prompt == ""
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", "How much?"),
    ]
    assert _cli(address, "generate", "instruct", "Hi", "--chat").exit_code == 0
    assert [(m.role, m.content) for m in gateway.requests[-1].messages] == [("user", "Hi")]


def test_generate_says_when_a_raw_prompt_got_no_token(servers: Any) -> None:
    address, gateway, _ = servers
    result = _cli(address, "generate", "instruct", "How much?")
    assert result.exit_code == 0, result.output
    assert gateway.requests[-1].prompt == "How much?"
    assert "0 tokens" in result.stderr
    assert "try --chat" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--meta", "team"], "--meta must be KEY=VALUE, got 'team'"),
        (["--meta", "a=1", "--meta", "a=2"], "--meta 'a' is given twice"),
    ],
)
def test_generate_bad_meta_is_a_usage_error(servers: Any, argv: list[str], needle: str) -> None:
    address, _, _ = servers
    result = _cli(address, "generate", "bot", "hi", *argv)
    assert result.exit_code == EXIT_USAGE
    assert needle in _one_error_line(result)


@pytest.mark.parametrize(
    ("argv", "code", "status"),
    [
        (["generate", "missing", "hi"], EXIT_NOT_FOUND, "NOT_FOUND"),
        (["generate", "draining", "hi"], EXIT_UNAVAILABLE, "UNAVAILABLE"),
        (["route", "get", "nobody"], EXIT_NOT_FOUND, "NOT_FOUND"),
        (["release", "promote", "bot"], EXIT_REFUSED, "FAILED_PRECONDITION"),
        (["feedback", "req_unknown", "1"], EXIT_NOT_FOUND, "NOT_FOUND"),
    ],
)
def test_server_errors_map_to_exit_codes(
    servers: Any, argv: list[str], code: int, status: str
) -> None:
    address, _, _ = servers
    result = _cli(address, *argv)
    assert result.exit_code == code, result.output
    line = _one_error_line(result)
    assert line.startswith(f"error: {status}: ")
    assert address in line
    assert result.stdout == ""


def test_feedback_reports_the_version_and_replacement(servers: Any) -> None:
    address, _, monitor = servers
    first = _cli(address, "feedback", "req_7", "0.25", "--comment", "too terse", "-o", "json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {
        "requestId": "req_7",
        "alias": "bot",
        "versionId": "ver_2",
        "arm": "candidate",
    }
    sent = monitor.feedback[-1]
    assert (sent.score, sent.comment) == (0.25, "too terse")
    again = _cli(address, "feedback", "req_7", "1")
    assert again.exit_code == 0, again.output
    assert "yes: an earlier score" in again.stdout
    assert "ver_2" in again.stdout


@pytest.mark.parametrize("score", ["1.5", "-0.1", "good"])
def test_feedback_score_outside_0_1_is_a_usage_error(servers: Any, score: str) -> None:
    address, _, monitor = servers
    before = len(monitor.feedback)
    result = _cli(address, "feedback", "req_7", "--", score)
    assert result.exit_code == EXIT_USAGE, result.output
    assert len(monitor.feedback) == before


def test_alerts_table_json_and_none(servers: Any) -> None:
    address, _, _ = servers
    table = _cli(address, "alerts")
    assert table.exit_code == 0, table.output
    assert "error_rate" in table.stdout
    assert "ver_2 fails 20% of requests" in table.stdout
    listed = json.loads(_cli(address, "alerts", "-o", "json").stdout)
    assert listed["alerts"][0]["threshold"] == 0.05
    quiet = _cli(address, "alerts", "quiet")
    assert quiet.stdout.strip() == "no alerts firing for quiet"
    assert json.loads(_cli(address, "alerts", "quiet", "-o", "json").stdout) == {}


def test_stats_table_and_json(servers: Any) -> None:
    address, _, _ = servers
    table = _cli(address, "stats")
    assert table.exit_code == 0, table.output
    assert "last 300s" in table.stdout
    assert "ver_1" in table.stdout
    assert json.loads(_cli(address, "stats", "-o", "json").stdout)["stats"][0]["requests"] == "12"
    assert "no requests seen for bot" in _cli(address, "stats", "bot").stdout


def test_release_status_shows_verdict_checks_and_figures(servers: Any) -> None:
    address, _, _ = servers
    result = _cli(address, "release", "status", "bot")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in (
        "verdict",
        "pass",
        "errors",
        "0/40 vs 1/120",
        "pending",
        "3 of 10 scores",
        "p_errors",
        "0.0312",
        "latency_ratio",
        "0.75 (n=3)",
        "2: candidate at 25%",
    ):
        assert needle in out, needle
    payload = json.loads(_cli(address, "release", "status", "bot", "-o", "json").stdout)
    assert payload["analysis"]["verdict"] == "pass"
    assert payload["analysis"]["checks"][1]["status"] == "pending"


def test_release_status_without_the_monitor_still_shows_the_route(servers: Any) -> None:
    address, _, _ = servers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    argv = [f"--gateway={address}", f"--monitor={down}", "release", "status", "bot"]
    result = CliRunner().invoke(app, [*argv, "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"route": {"alias": "bot", "stableVersionId": "ver_1"}}
    assert result.stderr.startswith("note: no live figures (UNAVAILABLE: cannot reach the monitor")


@pytest.mark.parametrize("output", ["json", "table"])
def test_release_watch_exit_code_says_how_the_release_ended(servers: Any, output: str) -> None:
    address, _, _ = servers
    promoted = _cli(address, "release", "watch", "promoted-bot", "-o", output, "--refresh=0.2")
    assert promoted.exit_code == 0, promoted.output
    rolled = _cli(address, "release", "watch", "rolled_back-bot", "-o", output, "--refresh=0.2")
    assert rolled.exit_code == EXIT_JOB_FAILED, rolled.output
    assert _one_error_line(rolled) == (
        "error: release rel_9 of rolled_back-bot ended rolled back: "
        "candidate error rate 0.31 > 0.05"
    )
    if output == "json":
        states = [json.loads(line)["state"] for line in rolled.stdout.splitlines()]
        assert states == ["running", "rolled_back"]
    else:
        assert "ver_2" in rolled.stdout


def test_up_delegates_to_the_dev_stack() -> None:
    shown = CliRunner().invoke(app, ["up", "--help"])
    assert shown.exit_code == 0
    assert "--no-demo" in shown.stdout
    assert "--workdir" in shown.stdout
    bad = CliRunner().invoke(app, ["up", "--no-such-flag"])
    assert bad.exit_code == EXIT_USAGE
    assert "--no-such-flag" in bad.stderr
