"""The per-request choice between a route's stable and candidate versions.

Order: flag rules (first match decides), then the weight — per request, or with a sticky
split by a hash of the user/session key, so that a user keeps its arm and raising the
weight only ever moves users from stable to candidate. ``mirrors`` then decides whether a
stable-arm request is also sent to the candidate in the background: ``shadow_percent``, or a
canary's evidence share while its step is small (docs/analysis.md, "mirrored evidence").
Pure given ``rng``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway.release_spec import CANARY

ARM_STABLE = "stable"
ARM_CANDIDATE = "candidate"
ARM_DIRECT = "direct"
ARM_BASE = "base"
ARM_SHADOW = "shadow"

# Metadata keys that name a session when the request carries no user.
SESSION_KEYS = ("session", "session_id", "x-session-id")


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True)
class Caller:
    """What flag rules and the sticky split look at."""

    tenant: str = ""
    user: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def sticky_key(self) -> str:
        if self.user:
            return self.user
        for key in SESSION_KEYS:
            if self.metadata.get(key):
                return self.metadata[key]
        return ""


@dataclass(frozen=True)
class Target:
    """Where one request goes: a version (empty = base model) and the arm it counts for."""

    version_id: str
    arm: str
    alias: str = ""
    release_id: str = ""
    flag: str = ""


def rule_matches(rule: events_pb2.FlagRule, caller: Caller) -> bool:
    """Every condition given must hold; a rule without conditions matches nothing."""
    if not (rule.tenants or rule.users or rule.metadata):
        return False
    if rule.tenants and caller.tenant not in rule.tenants:
        return False
    if rule.users and caller.user not in rule.users:
        return False
    return all(caller.metadata.get(k) == v for k, v in rule.metadata.items())


def sticky_bucket(alias: str, release_id: str, key: str) -> int:
    """0..99, stable for a (release, key); independent of the weight by construction."""
    digest = hashlib.sha256(f"{alias}\x00{release_id}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def choose(route: gateway_pb2.Route, rng: Rng = random, caller: Caller | None = None) -> Target:
    stable = Target(route.stable_version_id, ARM_STABLE, route.alias, route.release_id)
    if not route.candidate_version_id:
        return stable
    candidate = Target(route.candidate_version_id, ARM_CANDIDATE, route.alias, route.release_id)
    who = caller or Caller()
    for rule in route.flags:
        if rule_matches(rule, who):
            arm = candidate if rule.arm in ("", ARM_CANDIDATE) else stable
            return Target(arm.version_id, arm.arm, arm.alias, arm.release_id, rule.name)
    weight = min(route.candidate_weight, 100)
    if weight <= 0:
        return stable
    key = who.sticky_key if route.sticky else ""
    if key:
        bucket = sticky_bucket(route.alias, route.release_id, key)
        return candidate if bucket < weight else stable
    return candidate if rng.random() * 100 < weight else stable


def evidence_mirror_share(route: gateway_pb2.Route) -> float:
    """Percent of stable-arm requests a canary mirrors as evidence ("mirrored evidence").

    While the step's weight w is below the release's evidence share E, stable requests
    (100 - w % of the traffic) are mirrored with probability (E - w) / (100 - w), so the
    candidate's own requests and the mirrored ones together are E % of the traffic. At
    w >= E the step's own traffic is evidence enough: nothing is mirrored. A paused release
    collects no evidence, so it mirrors nothing either."""
    if (
        route.strategy not in (events_pb2.RELEASE_STRATEGY_UNSPECIFIED, CANARY)
        or route.paused
        or not route.candidate_version_id
    ):
        return 0.0
    wanted = min(route.evidence_mirror_percent, 100)
    weight = min(route.candidate_weight, 100)
    if weight >= wanted:
        return 0.0
    return 100.0 * (wanted - weight) / (100 - weight)


def mirror_share(route: gateway_pb2.Route) -> float:
    """Percent of stable-arm requests also sent to the candidate: the release's
    ``shadow_percent`` or a canary's evidence mirror, whichever is larger."""
    if not route.candidate_version_id:
        return 0.0
    return max(float(min(route.shadow_percent, 100)), evidence_mirror_share(route))


def mirrors(route: gateway_pb2.Route, target: Target, rng: Rng = random) -> bool:
    """Whether a stable-arm request is also sent, in the background, to the candidate."""
    if target.arm != ARM_STABLE:
        return False
    share = mirror_share(route)
    return share > 0 and rng.random() * 100 < share
