"""The registry's evaluation of a release's versions, looked up once at release start.

The evaluation gate already refuses bad versions before they are registered as ready;
this is the release-time double check (a version registered without the gate, or one
whose evaluation was recorded as refused) and the source of the evaluation figures shown
with the release's decisions. The registry being unreachable never blocks a release: the
check is skipped and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

# version_id -> its evaluation, None when unknown (registry unreachable, no such version).
EvaluationLookup = Callable[[str], Awaitable[common_pb2.Evaluation | None]]


@dataclass(frozen=True)
class EvaluationVerdict:
    failure: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def judge_evaluations(
    candidate: common_pb2.Evaluation | None, stable: common_pb2.Evaluation | None
) -> EvaluationVerdict:
    """A candidate fails only on an evaluation that refused it; an empty evaluation means
    the version was registered without one, which says nothing. A gate the job turned off
    passes with its reasons kept for information (the trainer reports what it would have
    refused): the operator chose to ship without it, so the release does not re-apply it."""
    figures: dict[str, float] = {}
    if candidate is not None:
        figures.update({f"eval_{k}": v for k, v in candidate.metrics.items()})
    if stable is not None:
        figures.update({f"stable_eval_{k}": v for k, v in stable.metrics.items()})
    if candidate is None:
        return EvaluationVerdict(figures=figures)
    refused = not candidate.gate_passed and bool(candidate.reasons or candidate.metrics)
    if not refused:
        return EvaluationVerdict(figures=figures)
    reasons = "; ".join(candidate.reasons) or "gate not passed"
    return EvaluationVerdict(f"registry evaluation refused the candidate: {reasons}", figures)


def registry_lookup(
    stub: registry_pb2_grpc.RegistryServiceStub, *, timeout_s: float = 5.0
) -> EvaluationLookup:
    async def lookup(version_id: str) -> common_pb2.Evaluation | None:
        try:
            version = await stub.GetVersion(
                registry_pb2.GetVersionRequest(version_id=version_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "evaluation of %s unavailable (%s: %s); release judged without it",
                version_id,
                err.code().name,
                err.details(),
            )
            return None
        evaluation: common_pb2.Evaluation = version.evaluation
        return evaluation

    return lookup
