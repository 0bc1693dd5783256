"""The installation namespace: how it maps names, what it refuses (naming the setting),
and how the dev stack passes it to every service."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from ftops_runtime.events import STREAMS
from ftops_runtime.namespace import RESERVED, Namespace, namespace_problem
from ftops_runtime.settings import ServiceSettings


def test_the_empty_namespace_keeps_todays_names() -> None:
    ns = Namespace()
    assert ns.subject("adapter.ready") == "adapter.ready"
    assert ns.logical_subject("adapter.ready") == "adapter.ready"
    assert ns.stream("FTOPS_ADAPTER") == "FTOPS_ADAPTER"
    assert ns.durable("inference-r1") == "inference-r1"
    assert ns.bucket("ftops-artifacts") == "ftops-artifacts"
    assert ns.redis_prefix() == ""


def test_a_namespace_prefixes_every_name_and_maps_subjects_back() -> None:
    ns = Namespace("team-a_1")
    assert ns.subject("work.trainer.gpu") == "team-a_1.work.trainer.gpu"
    assert ns.subject("inference.replica.>") == "team-a_1.inference.replica.>"
    assert ns.logical_subject("team-a_1.adapter.ready") == "adapter.ready"
    assert ns.stream("FTOPS_WORK") == "team-a_1_FTOPS_WORK"
    assert ns.durable("gateway-g1") == "team-a_1_gateway-g1"
    assert ns.bucket("ftops-artifacts") == "team-a_1_ftops-artifacts"
    assert ns.redis_prefix() + "ftops:route:bot" == "team-a_1:ftops:route:bot"


def test_every_first_subject_token_of_the_streams_is_reserved() -> None:
    """A namespace named like one would put its subjects inside the default installation's
    streams (NATS refuses overlapping streams): every stream's first token must be in the
    reserved list, including ones added later."""
    first_tokens = {s.split(".")[0] for spec in STREAMS for s in spec.subjects}
    assert first_tokens <= RESERVED
    for token in first_tokens:
        assert "first token" in (namespace_problem(token) or "")
        assert namespace_problem(token.upper()) is not None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("team.a", "only letters, digits"),
        ("team a", "only letters, digits"),
        ("team*", "only letters, digits"),
        ("a>", "only letters, digits"),
        ("a:b", "only letters, digits"),
        ("x" * 33, "longer than 32"),
        ("work", "first token"),
        ("_INBOX", "first token"),
    ],
)
def test_bad_namespaces_are_refused_at_start_naming_the_setting(value: str, why: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSettings(namespace=value)
    message = str(info.value)
    assert "FTOPS_NAMESPACE" in message
    assert why in message
    with pytest.raises(ValueError, match="FTOPS_NAMESPACE"):
        Namespace(value)


def test_the_namespace_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTOPS_NAMESPACE", "staging-b")
    assert ServiceSettings().installation() == Namespace("staging-b")
    monkeypatch.setenv("FTOPS_NAMESPACE", "staging.b")
    with pytest.raises(ValidationError, match="FTOPS_NAMESPACE"):
        ServiceSettings()


def test_the_dev_stack_gives_every_service_its_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftops_devstack.__main__ import dev_stack
    from ftops_devstack.stack import SERVICES

    # A developer's own variable does not put the stack's services elsewhere.
    monkeypatch.setenv("FTOPS_NAMESPACE", "someone-else")
    stack = dev_stack(
        tmp_path, "nats://127.0.0.1:1", "redis://127.0.0.1:2", tmp_path, auth=True, namespace="b"
    )
    names = [n for s in SERVICES for n in stack.names(s)] + ["gateway-http", "monitor-metrics"]
    ports = {name: 1000 + i for i, name in enumerate(names)}
    assert {stack._env(name, ports)["FTOPS_NAMESPACE"] for name in SERVICES} == {"b"}
    stack.namespace = ""
    assert stack._env("gateway", ports)["FTOPS_NAMESPACE"] == ""


def test_ftops_dev_up_shows_and_checks_the_namespace() -> None:
    from ftops_devstack.__main__ import describe_namespace, namespace_arg

    assert describe_namespace("").startswith("namespace: none")
    shown = describe_namespace("team-a")
    for shown_name in ("streams team-a_FTOPS_*", "subjects team-a.>", "Redis keys team-a:*"):
        assert shown_name in shown
    assert namespace_arg("team-a") == "team-a"
    with pytest.raises(argparse.ArgumentTypeError, match=r"--namespace='a\.b'"):
        namespace_arg("a.b")
