// ftops monitor dashboard: keeps the server-rendered page current by polling
// /dashboard/state and draws the charts as plain SVG.
//
// Polling on a timer, rather than holding a stream open, lets headless screenshot tools
// (chromium --screenshot --virtual-time-budget=...) finish: Chromium's virtual time stands
// still while any request is pending, and an open stream is pending forever.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  // Ten distinct colours, then hues a golden angle apart: no two lines of a group share one.
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"];
  const KEY_FIGURES = ["requests", "error_rate", "p95_ms", "stable_error_rate", "stable_p95_ms"];
  // Groups that are no alias (as dashboard_names.py names them), shown after the aliases.
  const LAST_GROUPS = ["direct to versions", "base model"];
  const MAX_EVENTS = 200;
  const MIN_SPAN_S = 60;
  const POLL_MS = 1000;
  const MAX_BACKOFF_MS = 30000;

  const state = {
    historyS: 900, releases: [], alerts: [], events: [], eventsRevision: null,
    versions: new Map(), splits: new Map(), since: null,
  };
  const groupColors = new Map(); // group -> (series key -> colour)

  // -- formatting -------------------------------------------------------------------

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function clock(at) {
    return new Date(at * 1000).toISOString().slice(11, 19);
  }
  function num(v) {
    if (v === null || v === undefined) return "-";
    return Math.abs(v) >= 1000 || v === Math.round(v) ? String(Math.round(v * 100) / 100) : String(Number(v.toPrecision(4)));
  }
  function figures(f) {
    const names = KEY_FIGURES.filter((k) => k in f).concat(Object.keys(f).filter((k) => !KEY_FIGURES.includes(k)).sort());
    return names.map((k) => `<span class="figure"><b>${esc(k)}</b> ${num(f[k])}</span>`).join(" ");
  }

  // -- the same markup as dashboard_page.py ---------------------------------------------

  function versionHtml(label, id) {
    return id ? `<span title="${esc(id)}">${esc(label || id)}</span>` : "-";
  }

  function releaseHtml(r) {
    const st = r.paused && r.state === "running" ? "paused" : r.state;
    const steps = r.steps.map((w, i) => `<span class="${i === r.step_index && r.state === "running" ? "current" : ""}">${w}%</span>`).join(" → ");
    const checks = r.checks.map((c) => `<tr class="check ${esc(c.status)}"><td>${esc(c.name)}</td><td>${esc(c.status)}</td><td>${esc(c.detail)}</td></tr>`).join("");
    const decisions = r.decisions.slice().reverse().map((d) =>
      `<li class="decision ${esc(d.level)}"><time>${clock(d.at)}</time> ${esc(d.text)}<div class="figures">${figures(d.figures)}</div></li>`).join("");
    const last = r.last_decision ? `<p class="last">last decision: <b>${esc(r.last_decision)}</b> ${esc(r.last_reason)}</p>` : "";
    return `<section class="release ${esc(st)}" data-alias="${esc(r.alias)}" data-release="${esc(r.release_id)}">
  <h3>${esc(r.alias)} <span class="badge state">${esc(st)}</span> <span class="badge strategy">${esc(r.strategy)}</span>
      <span class="release-id">${esc(r.release_id)}</span></h3>
  <dl>
    <dt>versions</dt><dd class="versions">${versionHtml(r.stable_label, r.stable_version_id)} → ${versionHtml(r.candidate_label, r.candidate_version_id)}</dd>
    <dt>step</dt><dd class="step">${r.step_index + 1}/${r.steps.length}</dd>
    <dt>weight</dt><dd class="weight">${r.weight}%</dd>
    <dt>steps</dt><dd class="steps">${steps}</dd>
    <dt>in step</dt><dd class="step-seconds">${Math.round(r.step_seconds)} s</dd>
    <dt>verdict</dt><dd class="verdict">${esc(r.verdict || "-")}</dd>
  </dl>
  ${last}
  <table class="checks">${checks}</table>
  <ul class="decisions">${decisions}</ul>
</section>`;
  }

  function renderReleases() {
    const el = document.getElementById("releases");
    el.innerHTML = state.releases.length ? state.releases.map(releaseHtml).join("") : '<p class="empty">No releases yet.</p>';
  }
  function renderAlerts() {
    const el = document.getElementById("alerts");
    el.innerHTML = state.alerts.length
      ? "<ul>" + state.alerts.map((a) => `<li class="alert"><b>${esc(a.rule)}</b> <span title="${esc(a.version_id)}">${esc(a.label || a.alias + "/" + a.version_id)}</span>: ${esc(a.message)} <span class="for">for ${Math.round(a.for_seconds)} s</span></li>`).join("") + "</ul>"
      : '<p class="empty">No alerts firing.</p>';
  }
  function renderEvents() {
    const el = document.getElementById("events");
    el.innerHTML = state.events.length
      ? "<ol>" + state.events.slice().reverse().map((e) => `<li class="event ${esc(e.level)}" data-subject="${esc(e.subject)}"><time>${clock(e.at)}</time> <span class="subject">${esc(e.subject)}</span> <span class="alias">${esc(e.alias)}</span> ${esc(e.text)}</li>`).join("") + "</ol>"
      : '<p class="empty">No events yet.</p>';
  }

  // -- charts -------------------------------------------------------------------------

  function nthColor(i) {
    if (i < PALETTE.length) return PALETTE[i];
    const hue = Math.round((i * 137.508) % 360);
    return `hsl(${hue}, 65%, ${i % 2 ? 35 : 48}%)`;
  }

  // Colours are given per group in the order the series first appear (sorted by label),
  // and kept: a line keeps its colour while others come and go.
  function colorsFor(group, series) {
    if (!groupColors.has(group)) groupColors.set(group, new Map());
    const colors = groupColors.get(group);
    for (const s of series) if (!colors.has(s.key)) colors.set(s.key, nthColor(colors.size));
    return colors;
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // lines: [{label, color, dash, step, points: [[t, v|null], ...]}]; key: legend entries of
  // the chart's own (the group's legend names the versions). maxCap: the axis never goes
  // past it (an error rate tops out at 100%).
  function chart(title, unit, lines, t0, t1, opts = {}) {
    const W = 340, H = 170, L = 46, R = 8, T = 22, B = 22;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    svg.appendChild(el("text", { x: L, y: 14, class: "title" }, title));
    let max = 0;
    for (const line of lines) for (const [, v] of line.points) if (v !== null && v > max) max = v;
    let yMax = opts.fixedMax || niceMax(max * 1.1);
    if (opts.maxCap) yMax = Math.min(yMax, opts.maxCap);
    const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
    const y = (v) => H - B - (v / yMax) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.appendChild(el("text", { x: L - 4, y: y(v) + 3, class: "tick y" }, num(v) + unit));
    }
    for (let i = 0; i <= 3; i++) {
      const t = t0 + ((t1 - t0) * i) / 3;
      const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
      svg.appendChild(el("text", { x: x(t), y: H - 6, class: "tick x", "text-anchor": anchor }, clock(t)));
    }
    for (const line of lines) {
      // Gaps (null) split the line: no data is not zero.
      let d = "", pen = false;
      for (const [t, v] of line.points) {
        if (v === null || t < t0) { pen = false; continue; }
        const py = y(Math.min(v, yMax)).toFixed(1);
        // Step lines hold their value until the next point (a weight changes at once).
        if (pen && line.step) d += `H${x(t).toFixed(1)}`;
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${py}`;
        pen = true;
      }
      if (!d) continue;
      const path = el("path", { d, stroke: line.color, "stroke-dasharray": line.dash || "", class: "line" });
      path.appendChild(el("title", {}, line.label)); // the name on hover
      svg.appendChild(path);
    }
    const box = document.createElement("figure");
    box.appendChild(svg);
    if (opts.key) box.appendChild(legend(opts.key));
    return box;
  }

  function legend(entries) {
    const node = document.createElement("div");
    node.className = "legend";
    node.innerHTML = entries.map((l) => `<span><i style="border-color:${l.color};border-style:${l.style || "solid"}"></i>${esc(l.label)}</span>`).join("");
    return node;
  }

  // Aliases with a release first, then other aliases and adapters, then the rest.
  function groupOrder(groups) {
    const released = new Set(state.releases.map((r) => r.alias));
    const rank = (g) => (LAST_GROUPS.includes(g) ? 2 + LAST_GROUPS.indexOf(g) : released.has(g) ? 0 : 1);
    return [...groups].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  }

  function renderCharts(now) {
    const root = document.getElementById("charts");
    // From the oldest point kept (at most the history), at least a minute wide.
    let first = now;
    for (const s of state.versions.values()) if (s.points.length) first = Math.min(first, s.points[0].t);
    for (const points of state.splits.values()) if (points.length) first = Math.min(first, points[0].t);
    const t1 = now, t0 = Math.min(Math.max(first, now - state.historyS), now - MIN_SPAN_S);
    const byGroup = new Map();
    for (const [key, s] of state.versions) {
      if (!byGroup.has(s.group)) byGroup.set(s.group, []);
      byGroup.get(s.group).push({ key, ...s });
    }
    for (const alias of state.splits.keys()) if (!byGroup.has(alias)) byGroup.set(alias, []);
    if (!byGroup.size) {
      root.innerHTML = '<p class="empty">No traffic yet.</p>';
      return;
    }
    const frag = document.createDocumentFragment();
    for (const group of groupOrder(byGroup.keys())) {
      const series = byGroup.get(group).sort((a, b) => a.label.localeCompare(b.label, undefined, { numeric: true }));
      const colors = colorsFor(group, series);
      const lines = (field, scale = 1) => series.map((s) => ({
        label: s.label, color: colors.get(s.key),
        points: s.points.map((p) => [p.t, p[field] === null ? null : p[field] * scale]),
      }));
      const latency = [];
      const percentiles = [["p50_ms", "", "p50", "solid"], ["p95_ms", "5 3", "p95", "dashed"], ["p99_ms", "1 3", "p99", "dotted"]];
      for (const s of series) {
        for (const [field, dash, name] of percentiles) {
          latency.push({ label: `${s.label} ${name}`, color: colors.get(s.key), dash, points: s.points.map((p) => [p.t, p[field]]) });
        }
      }
      const box = document.createElement("div");
      box.className = "alias-charts";
      box.dataset.alias = group;
      const h = document.createElement("h3");
      h.textContent = group;
      box.appendChild(h);
      if (series.length) box.appendChild(legend(series.map((s) => ({ label: s.label, color: colors.get(s.key) }))));
      const row = document.createElement("div");
      row.className = "chart-row";
      row.appendChild(chart("requests / s", "", lines("rps"), t0, t1));
      row.appendChild(chart("error rate", "%", lines("error_rate", 100), t0, t1, { maxCap: 100 }));
      row.appendChild(chart("latency p50 / p95 / p99", "ms", latency, t0, t1, {
        key: percentiles.map(([, , name, style]) => ({ label: name, color: "#6b7280", style })),
      }));
      row.appendChild(chart("feedback mean", "", lines("feedback_mean"), t0, t1, { fixedMax: 1 }));
      const split = state.splits.get(group);
      if (split) {
        row.appendChild(chart("candidate traffic %", "", [
          { label: "release weight", color: "#111827", step: true, points: split.map((p) => [p.t, p.weight]) },
          { label: "observed", color: "#f59e0b", dash: "4 3", points: split.map((p) => [p.t, p.observed]) },
        ], t0, t1, {
          fixedMax: 100,
          key: [{ label: "release weight", color: "#111827" }, { label: "observed", color: "#f59e0b", style: "dashed" }],
        }));
      }
      box.appendChild(row);
      frag.appendChild(box);
    }
    root.replaceChildren(frag);
  }

  // -- state updates ------------------------------------------------------------------

  function trim(points, now) {
    const cutoff = now - state.historyS;
    let i = 0;
    while (i < points.length && points[i].t < cutoff) i++;
    if (i) points.splice(0, i);
  }

  // One answer of /dashboard/state: everything on the first poll, then the chart points
  // taken since the previous one (and the event list when it changed).
  function apply(s) {
    state.historyS = s.history_s;
    state.releases = s.releases;
    state.alerts = s.alerts;
    if (s.events) state.events = s.events.slice(-MAX_EVENTS);
    state.eventsRevision = s.events_revision;
    for (const v of s.versions) {
      const key = `${v.alias}\u0000${v.version_id}`;
      const known = state.versions.get(key);
      if (!known) {
        state.versions.set(key, { alias: v.alias, version_id: v.version_id, group: v.group, label: v.label, points: v.points });
        continue;
      }
      // Named once the registry has answered: the label and group follow.
      known.group = v.group;
      known.label = v.label;
      known.points.push(...v.points);
    }
    for (const sp of s.splits) {
      if (!state.splits.has(sp.alias)) state.splits.set(sp.alias, []);
      state.splits.get(sp.alias).push(...sp.points);
    }
    for (const [key, v] of state.versions) {
      trim(v.points, s.now);
      if (!v.points.length) state.versions.delete(key);
    }
    for (const [alias, points] of state.splits) {
      trim(points, s.now);
      if (!points.length) state.splits.delete(alias);
    }
    state.since = s.now;
    renderReleases();
    renderAlerts();
    renderEvents();
    renderCharts(s.now);
    document.getElementById("updated").textContent = "updated " + clock(s.now) + " UTC";
  }

  // -- polling ------------------------------------------------------------------------

  let timer = null, polling = false, failures = 0, stopped = false;

  function status(text, kind) {
    const badge = document.getElementById("connection");
    badge.textContent = text;
    badge.className = "badge " + kind;
  }

  function schedule(ms) {
    if (!stopped && timer === null) timer = setTimeout(poll, ms);
  }

  async function poll() {
    timer = null;
    // A hidden tab asks for nothing; it catches up when shown (visibilitychange).
    if (document.hidden || polling || stopped) return;
    polling = true;
    const query = new URLSearchParams();
    if (state.since !== null) query.set("since", state.since);
    if (state.eventsRevision !== null) query.set("events", state.eventsRevision);
    try {
      const response = await fetch("/dashboard/state?" + query, { cache: "no-store", credentials: "same-origin" });
      if (response.status === 401) {
        // The key was revoked or expired: no more updates until a key is given again.
        stopped = true;
        status("key refused: reload to sign in", "down");
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      apply(await response.json());
      failures = 0;
      status("live", "live");
    } catch (err) {
      failures += 1;
      status("reconnecting", "down");
    } finally {
      polling = false;
    }
    // Backs off while the monitor is away: 2, 4, 8 ... at most 30 s between tries.
    schedule(failures ? Math.min(POLL_MS * 2 ** failures, MAX_BACKOFF_MS) : POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      if (timer !== null) clearTimeout(timer);
      timer = null;
      if (!stopped) status("paused while hidden", "");
    } else {
      poll();
    }
  });

  poll();
})();
