"""The installation namespace: what keeps several ftops installations apart on one NATS
server and one Redis (two teams' staging stacks, a test run next to a dev stack).

One setting, ``FTOPS_NAMESPACE``, prefixes everything an installation names on shared
infrastructure: JetStream streams and durable consumers, every subject (events, work
queues, dead letters, replica announcements), object-store buckets and Redis keys and
channels. Empty (the default) keeps the names ftops always had, so an existing
deployment keeps its streams and routes.

Services speak logical subjects (``adapter.ready``); the bus maps them to the
installation's (``teamA.adapter.ready``) and back, so no service code spells a prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SETTING = "FTOPS_NAMESPACE"
MAX_LENGTH = 32
# Allowed in a NATS subject token, a stream and consumer name, an object-store bucket
# name and a Redis key alike (no '.', '*', '>', whitespace, path separators or ':').
_ALLOWED = re.compile(r"[A-Za-z0-9_-]+")
# The first tokens of the default installation's subjects: a namespace equal to one would
# give subjects (``adapter.adapter.ready``) that the default installation's streams
# (``adapter.>``) also capture, and NATS refuses streams whose subjects overlap.
RESERVED = frozenset(
    {
        "adapter",
        "release",
        "route",
        "metrics",
        "trainer",
        "work",
        "inference",
        "monitor",
        "auth",
        "audit",
        "deadletter",
        "_inbox",  # clients' reply subjects
    }
)


def namespace_problem(name: str) -> str | None:
    """Why ``name`` cannot be a namespace (naming the setting), or None when it can."""
    if name == "":
        return None
    if len(name) > MAX_LENGTH:
        return f"{SETTING}={name!r} is longer than {MAX_LENGTH} characters"
    if not _ALLOWED.fullmatch(name):
        return (
            f"{SETTING}={name!r} may contain only letters, digits, '-' and '_' (it becomes "
            "a NATS subject token and part of stream, consumer, bucket and Redis key names)"
        )
    if name.lower() in RESERVED:
        return (
            f"{SETTING}={name!r} is the first token of an ftops subject; its subjects would "
            f"overlap the default installation's streams (reserved: {', '.join(sorted(RESERVED))})"
        )
    return None


@dataclass(frozen=True)
class Namespace:
    """Maps the names ftops uses to this installation's names on shared servers."""

    name: str = ""

    def __post_init__(self) -> None:
        problem = namespace_problem(self.name)
        if problem:
            raise ValueError(problem)

    def subject(self, subject: str) -> str:
        """``adapter.ready`` -> ``<ns>.adapter.ready`` (wildcards included)."""
        return f"{self.name}.{subject}" if self.name else subject

    def logical_subject(self, subject: str) -> str:
        """The inverse of ``subject``: what a handler sees of a delivered message."""
        prefix = f"{self.name}."
        return subject.removeprefix(prefix) if self.name else subject

    def stream(self, stream: str) -> str:
        """``FTOPS_ADAPTER`` -> ``<ns>_FTOPS_ADAPTER``."""
        return f"{self.name}_{stream}" if self.name else stream

    def durable(self, durable: str) -> str:
        # Consumers live inside the (already namespaced) streams; the prefix still tells
        # an operator listing consumers whose they are.
        return f"{self.name}_{durable}" if self.name else durable

    def bucket(self, bucket: str) -> str:
        """Object-store bucket: ``ftops-artifacts`` -> ``<ns>_ftops-artifacts``."""
        return f"{self.name}_{bucket}" if self.name else bucket

    def redis_prefix(self) -> str:
        """Prepended to every Redis key and channel: ``<ns>:`` (``ftops:route:x`` becomes
        ``<ns>:ftops:route:x``); ':' cannot be in a namespace, so no two overlap."""
        return f"{self.name}:" if self.name else ""
