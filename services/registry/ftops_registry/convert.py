"""Database rows to protobuf messages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ftops.common.v1 import common_pb2
from ftops.registry.v1 import registry_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_registry.models import (
    AdapterRow,
    AliasRow,
    ArtifactFileRow,
    ArtifactRow,
    BaseModelRow,
    JobRow,
    ReleaseDecisionRow,
    ReleaseRow,
    VersionRow,
)


def timestamp(dt: datetime) -> Timestamp:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    if ts.seconds == 0 and ts.nanos == 0:
        return datetime.now(UTC)
    return ts.ToDatetime(tzinfo=UTC)


def as_utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def json_numbers(values: Mapping[str, float]) -> dict[str, float | str]:
    """Floats for a JSON column. JSON has no NaN/Infinity (Postgres refuses the tokens), and
    a diverged run's metrics are exactly what a rejected version must keep: store those as
    strings, which ``float()`` reads back."""
    return {k: v if math.isfinite(v) else str(v) for k, v in values.items()}


def evaluation_json(ev: common_pb2.Evaluation) -> dict[str, Any]:
    return {
        "gate_passed": ev.gate_passed,
        "reasons": list(ev.reasons),
        "metrics": json_numbers(ev.metrics),
    }


def evaluation(data: Mapping[str, Any]) -> common_pb2.Evaluation:
    return common_pb2.Evaluation(
        gate_passed=bool(data.get("gate_passed", False)),
        reasons=[str(r) for r in data.get("reasons", [])],
        metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
    )


def base_model(row: BaseModelRow) -> registry_pb2.BaseModel:
    return registry_pb2.BaseModel(
        name=row.name,
        fingerprint=row.fingerprint,
        uri=row.uri,
        created_at=timestamp(row.created_at),
    )


def artifact_files(files: Sequence[ArtifactFileRow]) -> list[common_pb2.ArtifactFile]:
    return [
        common_pb2.ArtifactFile(path=f.path, sha256=f.sha256, size_bytes=f.size)
        for f in sorted(files, key=lambda f: f.position)
    ]


def artifact(row: ArtifactRow, files: Sequence[ArtifactFileRow]) -> registry_pb2.Artifact:
    return registry_pb2.Artifact(
        artifact_id=row.artifact_id, files=artifact_files(files), total_bytes=row.total_bytes
    )


def version(
    row: VersionRow, adapter: AdapterRow, files: Sequence[ArtifactFileRow]
) -> registry_pb2.Version:
    return registry_pb2.Version(
        version_id=row.version_id,
        adapter=row.adapter,
        number=row.number,
        team=adapter.team,
        base_model=adapter.base_model,
        base_model_fingerprint=row.base_model_fingerprint,
        parent_version_id=row.parent_version_id or "",
        artifact_id=row.artifact_id,
        files=artifact_files(files),
        job_id=row.job_id,
        dataset_fingerprint=row.dataset_fingerprint,
        method=row.method,
        metrics={k: float(v) for k, v in row.metrics.items()},
        labels={k: str(v) for k, v in row.labels.items()},
        created_at=timestamp(row.created_at),
        archived=row.archived,
        state=row.state,
        evaluation=evaluation(row.evaluation) if row.evaluation is not None else None,
        replay_artifact_id=row.replay_artifact_id or "",
        dataset_artifact_id=row.dataset_artifact_id or "",
    )


def alias(row: AliasRow) -> registry_pb2.Alias:
    return registry_pb2.Alias(
        adapter=row.adapter,
        name=row.name,
        version_id=row.version_id,
        updated_at=timestamp(row.updated_at),
    )


def decision(row: ReleaseDecisionRow) -> registry_pb2.ReleaseDecision:
    return registry_pb2.ReleaseDecision(
        event_id=row.event_id,
        kind=row.kind,
        weight=row.weight,
        final=row.final,
        reason=row.reason,
        figures={k: float(v) for k, v in row.figures.items()},
        occurred_at=timestamp(row.occurred_at),
        manual=row.manual,
    )


def release(row: ReleaseRow, history: Sequence[ReleaseDecisionRow]) -> registry_pb2.Release:
    return registry_pb2.Release(
        release_id=row.release_id,
        alias=row.alias,
        stable_version_id=row.stable_version_id,
        candidate_version_id=row.candidate_version_id,
        strategy=row.strategy,
        state=row.state,
        current_weight=row.current_weight,
        steps=list(row.steps),
        history=[decision(d) for d in history],
        started_at=timestamp(row.started_at),
        updated_at=timestamp(row.updated_at),
    )


def job_record(row: JobRow) -> registry_pb2.JobRecord:
    return registry_pb2.JobRecord(job=trainer_pb2.Job.FromString(row.job), revision=row.revision)
