"""Benchmark results: one JSON file and one readable table per benchmark, under
bench/results/. Each benchmark measures a baseline in the same run, so the ratio is
meaningful on any machine."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    case: str
    n: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    p99_ms: float
    per_s: float


@dataclass
class Report:
    name: str
    description: str
    baseline: str
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, float | str] = field(default_factory=dict)

    def add(self, case: str, samples_s: list[float], wall_s: float | None = None) -> Row:
        ms = sorted(s * 1000 for s in samples_s)
        row = Row(
            case=case,
            n=len(ms),
            p50_ms=round(statistics.median(ms), 3),
            p95_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 3),
            mean_ms=round(statistics.fmean(ms), 3),
            p99_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            per_s=round(len(ms) / (wall_s if wall_s else sum(samples_s)), 1),
        )
        self.rows.append(row)
        return row

    def table(self) -> str:
        lines = [
            f"{self.name}: {self.description}",
            f"baseline: {self.baseline}",
            f"{'case':<34} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9}"
            f" {'per s':>9}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.case:<34} {r.n:>6} {r.p50_ms:>9.3f} {r.p95_ms:>9.3f} {r.p99_ms:>9.3f}"
                f" {r.mean_ms:>9.3f} {r.per_s:>9.1f}"
            )
        for key, value in self.notes.items():
            lines.append(f"{key}: {value}")
        return "\n".join(lines)

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        payload = {
            **asdict(self),
            "machine": {"python": platform.python_version(), "cpu": platform.processor()},
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(payload, indent=2))
        (RESULTS / f"{self.name}.txt").write_text(self.table() + "\n")
        print(self.table())
        return path


def write_rows(
    name: str,
    description: str,
    header: str,
    lines: list[str],
    rows: list[Any],
    notes: dict[str, str | float],
    *,
    quick: bool,
    baseline: str = "the base model (no adapter)",
) -> Path:
    """For benchmarks with rows of their own shape (dataclasses) and their own table lines:
    the same JSON + readable table as ``Report.write``."""
    table = "\n".join(
        [f"{name}: {description}", f"baseline: {baseline}", header, *lines]
        + [f"{k}: {v}" for k, v in notes.items()]
    )
    payload = {
        "name": name,
        "description": description,
        "baseline": baseline,
        "quick": quick,
        "rows": [asdict(r) for r in rows],
        "notes": notes,
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.txt").write_text(table + "\n")
    print(table)
    return path
