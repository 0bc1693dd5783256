"""End to end through the ``ftops`` CLI (in-process, against the shared stack): train two
versions, route, generate (streamed, with feedback on the answer), a manual canary promoted
to the end, rollback, history."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from ftops_cli.app import app
from ftops_devstack.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ALIAS = "cli-bot"


def _cli(stack: Stack, *argv: str) -> Result:
    overrides = [
        f"--{name}={stack.address(name)}" for name in ("gateway", "trainer", "registry", "monitor")
    ]
    result = CliRunner().invoke(app, [*overrides, *argv])
    assert result.exit_code == 0, f"ftops {' '.join(argv)}: {result.output}"
    return result


def _json(stack: Stack, *argv: str) -> Any:
    return json.loads(_cli(stack, *argv, "--output", "json").stdout)


def _until(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.2)


def _generate(stack: Stack, model: str) -> Result | None:
    overrides = [f"--gateway={stack.address('gateway')}"]
    argv = [*overrides, "generate", model, "Product LZ-59 costs", "--max-tokens", "4"]
    result = CliRunner().invoke(app, argv)
    return result if result.exit_code == 0 else None


def _attempt(stack: Stack, *argv: str) -> Any:
    """``--output json`` of a command that may not succeed yet (None until it does)."""
    overrides = [f"--{name}={stack.address(name)}" for name in ("gateway", "monitor")]
    result = CliRunner().invoke(app, [*overrides, *argv, "--output", "json"])
    return json.loads(result.stdout) if result.exit_code == 0 else None


def _stream_and_score(stack: Stack, version_id: str) -> None:
    chunks_out = _cli(
        stack,
        "generate",
        ALIAS,
        "Product LZ-59 costs",
        "--max-tokens",
        "4",
        "--user",
        "cli-user",
        "--meta",
        "team=cli",
        "--output",
        "json",
    ).stdout
    chunks = [json.loads(line) for line in chunks_out.splitlines()]
    assert chunks
    assert chunks[0]["requestId"]
    assert {c["versionId"] for c in chunks} == {version_id}
    assert any(c.get("finishReason") for c in chunks)
    request_id = chunks[0]["requestId"]
    # The gateway's result reaches the monitor over NATS: NOT_FOUND (exit 5) until then.
    scored = _until(
        "the monitor to know the request",
        lambda: _attempt(stack, "feedback", request_id, "0.8", "--comment", "cli"),
    )
    assert (scored["requestId"], scored["versionId"]) == (request_id, version_id)
    stats = _until(
        "the feedback in the stats",
        lambda: [
            s
            for s in _json(stack, "stats", ALIAS).get("stats", [])
            if s["versionId"] == version_id and s.get("feedbackCount")
        ],
    )
    assert stats[0]["feedbackMean"] == pytest.approx(0.8)
    assert isinstance(_json(stack, "alerts", ALIAS), dict)


def test_cli_update_loop(stack: Stack, tmp_path: Path) -> None:
    from ftops_tinymodel import new_facts

    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(f) for f in new_facts()[:8]))
    spec = tmp_path / "spec.yaml"
    # The tiny model forgets fast (bench/forgetting.py): ask the gate for less than 0.95.
    spec.write_text(
        f"adapter: {ALIAS}\ndataset: {data.name}\nlora_target: q_proj,v_proj\n"
        "replay_ratio: 0.5\nmin_retention: 0.3\n"
    )

    v1 = _json(
        stack,
        "train",
        "--adapter",
        ALIAS,
        "--data",
        str(data),
        # Enough for the 8 facts word for word (the gate checks it): 30 left one out.
        "--max-steps",
        "60",
        "--replay-ratio",
        "0.5",
        "--min-retention",
        "0.3",
    )
    assert v1["state"] == "JOB_STATE_SUCCEEDED"
    # A new adapter's first ready version is routed: the alias answers without `route set`.
    assert _json(stack, "route", "get", ALIAS)["stableVersionId"] == v1["versionId"]
    v2 = _json(
        stack, "train", "--spec", str(spec), "--parent", v1["versionId"], "--max-steps", "10"
    )
    assert v2["spec"]["parentVersionId"] == v1["versionId"]
    # An alias with a route is left alone: v2 goes out through a release.
    assert _json(stack, "route", "get", ALIAS)["stableVersionId"] == v1["versionId"]

    versions = _json(stack, "versions", ALIAS)["versions"]
    assert {v["versionId"] for v in versions} == {v1["versionId"], v2["versionId"]}
    lineage = _json(stack, "lineage", v2["versionId"])
    assert [v["versionId"] for v in lineage["chain"]] == [v2["versionId"], v1["versionId"]]

    _cli(stack, "route", "set", ALIAS, v1["versionId"])
    # The inference service hot-loads the versions on adapter.ready: retry until served.
    generated = _until("v1 to be served", lambda: _generate(stack, ALIAS))
    assert generated.stdout.strip()
    assert f"· {v1['versionId']} " in generated.stderr  # the request id and who answered
    _stream_and_score(stack, v1["versionId"])
    _until("v2 to be served", lambda: _generate(stack, v2["versionId"]))

    _cli(stack, "release", "start", ALIAS, v2["versionId"], "--steps", "10,50,100", "--manual")
    status = _json(stack, "release", "status", ALIAS)
    assert status["route"]["candidateVersionId"] == v2["versionId"]
    assert status["route"]["candidateWeight"] == 10
    # The monitor learns of the release from the gateway's route.changed on NATS.
    _until(
        "the monitor to see the release",
        lambda: _json(stack, "release", "status", ALIAS)["analysis"].get("releaseId"),
    )

    _cli(stack, "release", "promote", ALIAS, "--reason", "cli: step")
    _until("50%", lambda: _json(stack, "route", "get", ALIAS).get("candidateWeight") == 50)
    _cli(stack, "release", "promote", ALIAS, "--reason", "cli: final")
    _until(
        "v2 stable",
        lambda: _json(stack, "route", "get", ALIAS)["stableVersionId"] == v2["versionId"],
    )
    _cli(stack, "release", "rollback", ALIAS, "--reason", "cli: back")
    _until(
        "v1 stable",
        lambda: _json(stack, "route", "get", ALIAS)["stableVersionId"] == v1["versionId"],
    )

    def decisions() -> list[dict[str, Any]] | None:
        releases = _json(stack, "release", "history", ALIAS).get("releases", [])
        history: list[dict[str, Any]] = releases[0].get("history", []) if releases else []
        kinds = [d["kind"] for d in history]
        # The registry records each change from route.changed as it arrives.
        complete = kinds.count("promote") == 2 and {"started", "rollback"} <= set(kinds)
        return history if complete else None

    history = _until("the release history", decisions)
    assert [d["kind"] for d in history].count("promote") == 2
    assert any(d.get("final") for d in history)
    assert v2["versionId"] in _cli(stack, "release", "history", ALIAS).stdout


def test_cli_bad_dataset_is_refused_at_submit_with_exit_2(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine", "completion": "ok"}\n{"prompt": "broken\n')
    trainer = f"--trainer={stack.address('trainer')}"
    result = CliRunner().invoke(app, [trainer, "train", "--adapter", "cli-bad", "--data", str(bad)])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert "INVALID_ARGUMENT" in last
    assert "line 2" in last
    listed = _json(stack, "jobs", "list", "--adapter", "cli-bad")
    assert not listed.get("jobs")  # nothing was stored for the refused job
