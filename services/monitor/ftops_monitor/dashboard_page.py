"""The dashboard page, rendered on the server from a snapshot: the releases, alerts and
recent events are in the HTML itself (readable without the script); the script
(static/dashboard.js) draws the charts and re-renders the same markup on live updates."""

from __future__ import annotations

import hashlib
import time
from html import escape
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).parent / "static"
# Figures shown first in a decision, in this order; the rest follow by name.
KEY_FIGURES = ("requests", "error_rate", "p95_ms", "stable_error_rate", "stable_p95_ms")


def _asset_version() -> str:
    """Changes whenever a static file does, so browsers never run a stale script."""
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


ASSET_VERSION = _asset_version()


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _figures(figures: dict[str, float | None]) -> str:
    names = [k for k in KEY_FIGURES if k in figures] + sorted(
        k for k in figures if k not in KEY_FIGURES
    )
    # Spaces between the figures: a long list wraps inside its card.
    return " ".join(
        f'<span class="figure"><b>{escape(k)}</b> {_number(figures[k])}</span>' for k in names
    )


def _steps(release: dict[str, Any]) -> str:
    parts = []
    for i, weight in enumerate(release["steps"]):
        current = i == release["step_index"] and release["state"] == "running"
        parts.append(f'<span class="{"current" if current else ""}">{weight}%</span>')
    return " → ".join(parts)


def _version(label: str | None, version_id: str) -> str:
    """``alias:vN``, the id on hover."""
    if not version_id:
        return "-"
    return f'<span title="{escape(version_id)}">{escape(label or version_id)}</span>'


def _release(r: dict[str, Any]) -> str:
    state = "paused" if r["paused"] and r["state"] == "running" else r["state"]
    checks = "".join(
        f'<tr class="check {escape(c["status"])}"><td>{escape(c["name"])}</td>'
        f"<td>{escape(c['status'])}</td><td>{escape(c['detail'])}</td></tr>"
        for c in r["checks"]
    )
    decisions = "".join(
        f'<li class="decision {escape(d["level"])}"><time>{_clock(d["at"])}</time> '
        f'{escape(d["text"])}<div class="figures">{_figures(d["figures"])}</div></li>'
        for d in reversed(r["decisions"])
    )
    last = (
        f'<p class="last">last decision: <b>{escape(r["last_decision"])}</b> '
        f"{escape(r['last_reason'])}</p>"
        if r["last_decision"]
        else ""
    )
    return f"""
<section class="release {escape(state)}" data-alias="{escape(r["alias"])}"
         data-release="{escape(r["release_id"])}">
  <h3>{escape(r["alias"])} <span class="badge state">{escape(state)}</span>
      <span class="badge strategy">{escape(r["strategy"])}</span>
      <span class="release-id">{escape(r["release_id"])}</span></h3>
  <dl>
    <dt>versions</dt><dd class="versions">{_version(r.get("stable_label"), r["stable_version_id"])}
      → {_version(r.get("candidate_label"), r["candidate_version_id"])}</dd>
    <dt>step</dt><dd class="step">{r["step_index"] + 1}/{len(r["steps"])}</dd>
    <dt>weight</dt><dd class="weight">{r["weight"]}%</dd>
    <dt>steps</dt><dd class="steps">{_steps(r)}</dd>
    <dt>in step</dt><dd class="step-seconds">{r["step_seconds"]:.0f} s</dd>
    <dt>verdict</dt><dd class="verdict">{escape(r["verdict"] or "-")}</dd>
  </dl>
  {last}
  <table class="checks">{checks}</table>
  <ul class="decisions">{decisions}</ul>
</section>"""


def render_releases(releases: list[dict[str, Any]]) -> str:
    if not releases:
        return '<p class="empty">No releases yet.</p>'
    return "".join(_release(r) for r in releases)


def _alert_series(alert: dict[str, Any]) -> str:
    label = alert.get("label") or f"{alert['alias']}/{alert['version_id']}"
    return f'<span title="{escape(alert["version_id"])}">{escape(label)}</span>'


def render_alerts(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return '<p class="empty">No alerts firing.</p>'
    return (
        "<ul>"
        + "".join(
            f'<li class="alert"><b>{escape(a["rule"])}</b> {_alert_series(a)}: '
            f"{escape(a['message'])} "
            f'<span class="for">for {a["for_seconds"]:.0f} s</span></li>'
            for a in alerts
        )
        + "</ul>"
    )


def render_events(events: list[dict[str, Any]]) -> str:
    if not events:
        return '<p class="empty">No events yet.</p>'
    return (
        "<ol>"
        + "".join(
            f'<li class="event {escape(e["level"])}" data-subject="{escape(e["subject"])}">'
            f'<time>{_clock(e["at"])}</time> <span class="subject">{escape(e["subject"])}</span> '
            f'<span class="alias">{escape(e["alias"])}</span> {escape(e["text"])}</li>'
            for e in reversed(events)
        )
        + "</ol>"
    )


def render_page(snapshot: dict[str, Any]) -> str:
    v = ASSET_VERSION
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ftops monitor</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css?v={v}">
</head>
<body>
<header>
  <h1>ftops monitor</h1>
  <span id="connection" class="badge">connecting</span>
  <span id="updated"></span>
</header>
<main>
  <section id="releases-panel">
    <h2>Releases</h2>
    <div id="releases">{render_releases(snapshot["releases"])}</div>
  </section>
  <section id="alerts-panel">
    <h2>Active alerts</h2>
    <div id="alerts">{render_alerts(snapshot["alerts"])}</div>
  </section>
  <section id="charts-panel">
    <h2>Per version, last {snapshot["history_s"] / 60:.0f} min</h2>
    <p class="note">Request and error rate per second; latency percentiles of successful
      requests over the last {snapshot["latency_window_s"]:.0f} s; feedback mean over the
      monitor's {snapshot["window_s"]:.0f} s window.</p>
    <div id="charts"><p class="empty">Charts need the page's script.</p></div>
  </section>
  <section id="events-panel">
    <h2>Recent events</h2>
    <div id="events">{render_events(snapshot["events"])}</div>
  </section>
</main>
<script src="/dashboard/static/dashboard.js?v={v}"></script>
</body>
</html>
"""
