"""How the monitor's release analysis is shown: the verdict, the checks behind it, both
arms' figures and the test statistics (``ftops release status`` and ``watch``)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ftops.monitor.v1 import monitor_pb2
from ftops_cli.output import or_dash, table

_STATUS_STYLE = {"pass": "green", "fail": "bold red", "pending": "yellow", "off": "dim"}


def analysis_fields(analysis: monitor_pb2.ReleaseAnalysis) -> list[tuple[str, object]]:
    state = analysis.state + (" (paused)" if analysis.paused else "")
    fields: list[tuple[str, object]] = [
        ("release", or_dash(analysis.release_id)),
        ("state", state),
        ("strategy", or_dash(analysis.strategy)),
    ]
    if analysis.state == "running":
        fields += [
            ("step", f"{analysis.step_index + 1}: candidate at {analysis.weight}%"),
            ("step time", f"{analysis.step_seconds:.0f}s"),
        ]
    fields += [
        ("verdict", or_dash(analysis.verdict)),
        ("last decision", or_dash(analysis.last_decision)),
        ("reason", or_dash(analysis.last_reason)),
    ]
    return fields


def arms_table(analysis: monitor_pb2.ReleaseAnalysis) -> Table:
    rows = []
    for arm, stats in (("stable", analysis.stable), ("candidate", analysis.candidate)):
        if not stats.version_id:
            continue
        feedback = (
            f"{stats.feedback_mean:.2f} (n={stats.feedback_count})" if stats.feedback_count else "-"
        )
        divergence = (
            f"{stats.divergence_mean:.3f} (n={stats.divergence_count})"
            if stats.divergence_count
            else "-"
        )
        rows.append(
            (
                arm,
                stats.version_id,
                stats.requests,
                f"{stats.error_rate:.3f}",
                f"{stats.latency_p50_ms:.0f}",
                f"{stats.latency_p95_ms:.0f}",
                f"{stats.ttft_p95_ms:.0f}",
                feedback,
                divergence,
            )
        )
    return table(
        "arms",
        (
            "arm",
            "version",
            "requests",
            "error rate",
            "p50 ms",
            "p95 ms",
            "ttft p95 ms",
            "feedback",
            "divergence",
        ),
        rows,
    )


def checks_table(analysis: monitor_pb2.ReleaseAnalysis) -> Table:
    t = Table(title="checks", title_justify="left")
    for column in ("check", "status", "detail"):
        t.add_column(column, overflow="fold")
    for check in analysis.checks:
        t.add_row(
            check.name, Text(check.status, style=_STATUS_STYLE.get(check.status, "")), check.detail
        )
    return t


def analysis_view(analysis: monitor_pb2.ReleaseAnalysis) -> Group:
    """Everything the monitor knows about the alias's release, as one renderable."""
    parts: list[Table] = [
        table(f"analysis of {analysis.alias}", ("field", "value"), analysis_fields(analysis))
    ]
    if analysis.stable.version_id or analysis.candidate.version_id:
        parts.append(arms_table(analysis))
    if analysis.checks:
        parts.append(checks_table(analysis))
    if analysis.figures:
        parts.append(table("figures (current step)", ("figure", "value"), _figure_rows(analysis)))
    return Group(*parts)


def _figure_rows(analysis: monitor_pb2.ReleaseAnalysis) -> list[tuple[str, str]]:
    return [(name, f"{value:.4g}") for name, value in sorted(analysis.figures.items())]
