"""What each stage did, for the job log and its status. Details are numbers only: they
go on the wire as ``map<string, double>``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftops_trainer.dataset import Record


@dataclass(frozen=True)
class StageReport:
    name: str
    records_in: int
    records_out: int
    details: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return self.records_in - self.records_out


@dataclass
class PipelineResult:
    records: list[Record]
    stages: list[StageReport]

    def summary(self) -> str:
        lines = []
        for s in self.stages:
            details = ", ".join(f"{k}={v:g}" for k, v in sorted(s.details.items()))
            lines.append(
                f"{s.name:<12} {s.records_in:>8} -> {s.records_out:<8} "
                f"({s.seconds * 1000:.0f} ms) {details}"
            )
        return "\n".join(lines)
