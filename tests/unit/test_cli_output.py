"""``--output json`` is MessageToDict output only; tables render the fields people need."""

from __future__ import annotations

import json

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.registry.v1 import registry_pb2
from ftops_cli import output
from ftops_cli.releases import _route_fields, release_fields


def test_json_is_message_to_dict(capsys: pytest.CaptureFixture[str]) -> None:
    route = gateway_pb2.Route(
        alias="bot", stable_version_id="ver_1", candidate_version_id="ver_2", candidate_weight=25
    )
    output.print_json(route)
    assert json.loads(capsys.readouterr().out) == MessageToDict(route)


def test_table_prints_rows(capsys: pytest.CaptureFixture[str]) -> None:
    output.print_table("versions", ("#", "version"), [(1, "ver_a"), (2, "ver_b")])
    out = capsys.readouterr().out
    assert "versions" in out
    assert "ver_a" in out
    assert "ver_b" in out


def test_route_fields_show_the_split() -> None:
    route = gateway_pb2.Route(
        alias="bot",
        stable_version_id="ver_1",
        candidate_version_id="ver_2",
        candidate_weight=25,
        steps=[25, 100],
    )
    fields = dict(_route_fields(route))
    assert fields["stable"] == "ver_1 (75%)"
    assert fields["candidate"] == "ver_2 (25%)"
    assert fields["step"] == "1/2"
    assert dict(_route_fields(gateway_pb2.Route(stable_version_id="ver_1")))["stable"] == (
        "ver_1 (100%)"
    )


def test_release_fields_show_split_steps_and_decision() -> None:
    route = gateway_pb2.Route(
        alias="bot",
        stable_version_id="ver_1",
        candidate_version_id="ver_2",
        candidate_weight=25,
        steps=[5, 25, 100],
        step_index=1,
        shadow_percent=10,
        release_id="rel_1",
        release_stable_version_id="ver_1",
        release_candidate_version_id="ver_2",
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        last_decision=registry_pb2.ReleaseDecision(
            kind="promote", weight=25, reason="error rate ok", figures={"requests": 40}
        ),
    )
    fields = dict(release_fields(gateway_pb2.Release(route=route, state="running")))
    assert fields["traffic"] == "ver_1 75% / ver_2 25%"
    assert fields["steps"] == "5% → [25%] → 100%"
    assert fields["mirrored"] == "10%"
    assert (fields["last decision"], fields["reason"]) == ("promote 25%", "error rate ok")
    assert fields["figures"] == "requests=40"
    done = dict(release_fields(gateway_pb2.Release(route=route, state="promoted")))
    assert "traffic" not in done


def test_small_formatters() -> None:
    assert output.job_state(events_pb2.JOB_STATE_SUCCEEDED) == "SUCCEEDED"
    assert output.or_dash("") == "-"
    assert output.when(Timestamp()) == ""
    assert output.when(Timestamp(seconds=86400)) == "1970-01-02 00:00:00"


def test_eta_is_shown_as_hours_minutes_seconds() -> None:
    from ftops_cli.train import _duration

    assert _duration(0) == "0:00:00"
    assert _duration(75.4) == "0:01:15"
    assert _duration(3 * 3600 + 61) == "3:01:01"
    assert _duration(-5) == "0:00:00"


def test_job_table_lists_the_skipped_lines_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    from ftops.trainer.v1 import trainer_pb2
    from ftops_cli.train import _print_job

    job = trainer_pb2.Job(job_id="job_1", records_total=1000, records_used=995, records_skipped=7)
    job.skipped_lines.add(line=3, reason="invalid JSON (Expecting value at column 1)")
    job.skipped_lines.add(line=9, reason='messages[0]: unknown role "[bold]x"')
    _print_job(job)
    out = capsys.readouterr().out
    assert "line 3: invalid JSON (Expecting value at column 1)" in out
    assert 'unknown role "[bold]x"' in out  # the user's text, not Rich markup
    assert "... and 5 more" in out


def test_a_multi_line_error_reads_as_one_line() -> None:
    from ftops_cli.errors import one_line

    message = "dataset has 2 bad lines out of 3:\nline 1: invalid JSON (x)\nline 3: bad\n"
    assert one_line(message) == (
        "dataset has 2 bad lines out of 3: line 1: invalid JSON (x); line 3: bad"
    )
