"""What a request result says about the version that served it. Pure Python.

The gateway names where a failure arose (``RequestResult.failure_origin``); results from
gateways older than that field carry only the gRPC status name, which is mapped the same
way. Only ``REPLICA`` failures are the version's own: capacity refusals, lost connections
and the gateway's deadline are outcomes of the platform under load, and counting them
against a candidate rolled back healthy ones during bursts (issue 13).
"""

from __future__ import annotations

from enum import StrEnum

# gRPC status names of results caused by the request, not by the version that served it.
CLIENT_FAULTS = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "CANCELLED"})


class Outcome(StrEnum):
    OK = "ok"
    # The request's fault (malformed, abandoned): says nothing about any version.
    CLIENT = "client"
    # The version's own failure: counted by the error tests.
    REPLICA = "replica"
    # Refused for load (replica queue full, gateway rate limit).
    CAPACITY = "capacity"
    # No replica reachable, connection lost.
    TRANSPORT = "transport"
    # The gateway's deadline passed: the candidate's only when it shows significantly
    # more of them than stable (the analysis' deadlines check).
    DEADLINE = "deadline"

    @property
    def infrastructure(self) -> bool:
        return self in _INFRASTRUCTURE


_INFRASTRUCTURE = frozenset({Outcome.CAPACITY, Outcome.TRANSPORT, Outcome.DEADLINE})
_BY_ORIGIN = {
    "replica": Outcome.REPLICA,
    "capacity": Outcome.CAPACITY,
    "transport": Outcome.TRANSPORT,
    "deadline": Outcome.DEADLINE,
}
# For results without ``failure_origin`` (gateways before it existed).
_BY_STATUS = {
    "RESOURCE_EXHAUSTED": Outcome.CAPACITY,
    "UNAVAILABLE": Outcome.TRANSPORT,
    "DEADLINE_EXCEEDED": Outcome.DEADLINE,
}


def classify(status: str, failure_origin: str = "") -> Outcome:
    """The outcome of a result with gRPC status name ``status``. A client fault stays one
    whatever the origin says; an origin this monitor does not know falls back on the
    status, as an empty one does."""
    if status == "OK":
        return Outcome.OK
    if status in CLIENT_FAULTS:
        return Outcome.CLIENT
    known = _BY_ORIGIN.get(failure_origin)
    if known is not None:
        return known
    return _BY_STATUS.get(status, Outcome.REPLICA)
