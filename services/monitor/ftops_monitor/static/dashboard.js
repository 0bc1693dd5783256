// ftops monitor dashboard: keeps the server-rendered page current from the
// /dashboard/stream server-sent events and draws the charts as plain SVG.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];
  const KEY_FIGURES = ["requests", "error_rate", "p95_ms", "stable_error_rate", "stable_p95_ms"];
  const MAX_EVENTS = 200;
  const MIN_SPAN_S = 60;

  const state = { historyS: 900, releases: [], alerts: [], events: [], versions: new Map(), splits: new Map() };
  const colorOf = new Map();

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
    return names.map((k) => `<span class="figure"><b>${esc(k)}</b> ${num(f[k])}</span>`).join("");
  }

  // -- the same markup as dashboard_page.py ---------------------------------------------

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
    <dt>versions</dt><dd>${esc(r.stable_version_id || "-")} → ${esc(r.candidate_version_id)}</dd>
    <dt>step</dt><dd class="step">${r.step_index}</dd>
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
      ? "<ul>" + state.alerts.map((a) => `<li class="alert"><b>${esc(a.rule)}</b> ${esc(a.alias)}/${esc(a.version_id)}: ${esc(a.message)} <span class="for">for ${Math.round(a.for_seconds)} s</span></li>`).join("") + "</ul>"
      : '<p class="empty">No alerts firing.</p>';
  }
  function renderEvents() {
    const el = document.getElementById("events");
    el.innerHTML = state.events.length
      ? "<ol>" + state.events.slice().reverse().map((e) => `<li class="event ${esc(e.level)}" data-subject="${esc(e.subject)}"><time>${clock(e.at)}</time> <span class="subject">${esc(e.subject)}</span> <span class="alias">${esc(e.alias)}</span> ${esc(e.text)}</li>`).join("") + "</ol>"
      : '<p class="empty">No events yet.</p>';
  }

  // -- charts -------------------------------------------------------------------------

  function color(key) {
    if (!colorOf.has(key)) colorOf.set(key, COLORS[colorOf.size % COLORS.length]);
    return colorOf.get(key);
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

  // lines: [{label, color, dash, points: [[t, v|null], ...]}]
  function chart(title, unit, lines, t0, t1, fixedMax) {
    const W = 340, H = 170, L = 46, R = 8, T = 22, B = 22;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    svg.appendChild(el("text", { x: L, y: 14, class: "title" }, title));
    let max = 0;
    for (const line of lines) for (const [, v] of line.points) if (v !== null && v > max) max = v;
    const yMax = fixedMax || niceMax(max * 1.1);
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
      if (d) svg.appendChild(el("path", { d, stroke: line.color, "stroke-dasharray": line.dash || "", class: "line" }));
    }
    const legend = document.createElement("div");
    legend.className = "legend";
    legend.innerHTML = lines.map((l) => `<span><i style="border-color:${l.color};border-style:${l.dash ? "dashed" : "solid"}"></i>${esc(l.label)}</span>`).join("");
    const box = document.createElement("figure");
    box.appendChild(svg);
    box.appendChild(legend);
    return box;
  }

  function renderCharts(now) {
    const root = document.getElementById("charts");
    // From the oldest point kept (at most the history), at least a minute wide.
    let first = now;
    for (const s of state.versions.values()) if (s.points.length) first = Math.min(first, s.points[0].t);
    for (const points of state.splits.values()) if (points.length) first = Math.min(first, points[0].t);
    const t1 = now, t0 = Math.min(Math.max(first, now - state.historyS), now - MIN_SPAN_S);
    const byAlias = new Map();
    for (const [key, s] of state.versions) {
      if (!byAlias.has(s.alias)) byAlias.set(s.alias, []);
      byAlias.get(s.alias).push({ key, ...s });
    }
    for (const alias of state.splits.keys()) if (!byAlias.has(alias)) byAlias.set(alias, []);
    if (!byAlias.size) {
      root.innerHTML = '<p class="empty">No traffic yet.</p>';
      return;
    }
    const frag = document.createDocumentFragment();
    for (const alias of [...byAlias.keys()].sort()) {
      const versions = byAlias.get(alias).sort((a, b) => a.version_id.localeCompare(b.version_id));
      const series = (field, scale = 1) => versions.map((s) => ({
        label: s.version_id, color: color(s.key),
        points: s.points.map((p) => [p.t, p[field] === null ? null : p[field] * scale]),
      }));
      const latency = [];
      for (const s of versions) {
        for (const [field, dash, name] of [["p50_ms", "", "p50"], ["p95_ms", "5 3", "p95"], ["p99_ms", "1 3", "p99"]]) {
          latency.push({ label: `${s.version_id} ${name}`, color: color(s.key), dash, points: s.points.map((p) => [p.t, p[field]]) });
        }
      }
      const group = document.createElement("div");
      group.className = "alias-charts";
      group.dataset.alias = alias;
      const h = document.createElement("h3");
      h.textContent = alias;
      group.appendChild(h);
      const row = document.createElement("div");
      row.className = "chart-row";
      row.appendChild(chart("requests / s", "", series("rps"), t0, t1));
      row.appendChild(chart("error rate", "%", series("error_rate", 100), t0, t1));
      row.appendChild(chart("latency p50 / p95 / p99", "ms", latency, t0, t1));
      row.appendChild(chart("feedback mean", "", series("feedback_mean"), t0, t1, 1));
      const split = state.splits.get(alias);
      if (split) {
        row.appendChild(chart("candidate traffic %", "", [
          { label: "release weight", color: "#111827", step: true, points: split.map((p) => [p.t, p.weight]) },
          { label: "observed", color: "#f59e0b", dash: "4 3", points: split.map((p) => [p.t, p.observed]) },
        ], t0, t1, 100));
      }
      group.appendChild(row);
      frag.appendChild(group);
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

  function onSnapshot(s) {
    state.historyS = s.history_s;
    state.releases = s.releases;
    state.alerts = s.alerts;
    state.events = s.events;
    state.versions = new Map(s.versions.map((v) => [`${v.alias}\u0000${v.version_id}`, v]));
    state.splits = new Map(s.splits.map((v) => [v.alias, v.points]));
    renderAll(s.now);
  }

  function onTick(t) {
    state.releases = t.releases;
    state.alerts = t.alerts;
    for (const v of t.versions) {
      const key = `${v.alias}\u0000${v.version_id}`;
      if (!state.versions.has(key)) state.versions.set(key, { alias: v.alias, version_id: v.version_id, points: [] });
      state.versions.get(key).points.push(v.point);
    }
    for (const s of t.splits) {
      if (!state.splits.has(s.alias)) state.splits.set(s.alias, []);
      state.splits.get(s.alias).push(s.point);
    }
    for (const [key, v] of state.versions) {
      trim(v.points, t.now);
      if (!v.points.length) state.versions.delete(key);
    }
    for (const [alias, points] of state.splits) {
      trim(points, t.now);
      if (!points.length) state.splits.delete(alias);
    }
    renderAll(t.now);
  }

  function onFeed(item) {
    state.events.push(item);
    state.events.sort((a, b) => a.at - b.at);
    if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
    // A decision shows on its release at once; the next tick brings the new step.
    const release = state.releases.find((r) => r.release_id === item.release_id);
    if (release && (item.subject === "release.promote" || item.subject === "release.rollback")) {
      if (!release.decisions.some((d) => d.event_id === item.event_id)) release.decisions.push(item);
      renderReleases();
    }
    renderEvents();
  }

  function renderAll(now) {
    renderReleases();
    renderAlerts();
    renderEvents();
    renderCharts(now);
    document.getElementById("updated").textContent = "updated " + clock(now) + " UTC";
  }

  function connect() {
    const status = document.getElementById("connection");
    const source = new EventSource("/dashboard/stream");
    source.addEventListener("open", () => { status.textContent = "live"; status.className = "badge live"; });
    source.addEventListener("error", () => { status.textContent = "reconnecting"; status.className = "badge down"; });
    source.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
    source.addEventListener("tick", (e) => onTick(JSON.parse(e.data)));
    source.addEventListener("feed", (e) => onFeed(JSON.parse(e.data)));
  }

  connect();
})();
