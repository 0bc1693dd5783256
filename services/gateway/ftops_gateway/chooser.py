"""The per-request weighted choice between a route's stable and candidate versions."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from ftops.gateway.v1 import gateway_pb2

ARM_STABLE = "stable"
ARM_CANDIDATE = "candidate"
ARM_DIRECT = "direct"
ARM_BASE = "base"


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True)
class Target:
    """Where one request goes: a version (empty = base model) and the arm it counts for."""

    version_id: str
    arm: str
    alias: str = ""
    release_id: str = ""


def choose(route: gateway_pb2.Route, rng: Rng = random) -> Target:
    """Candidate with probability ``candidate_weight``/100, else stable. Pure given ``rng``."""
    weight = min(route.candidate_weight, 100) if route.candidate_version_id else 0
    if weight > 0 and rng.random() * 100 < weight:
        return Target(route.candidate_version_id, ARM_CANDIDATE, route.alias, route.release_id)
    return Target(route.stable_version_id, ARM_STABLE, route.alias, route.release_id)
