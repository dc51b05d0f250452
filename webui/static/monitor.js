// Monitor page: draws GET /monitor.json (the scoring server's /monitor) as tables and SVG line plots.
"use strict";

const REFRESH_MS = 15000;
const COLOURS = ["#0284c7", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be123c", "#4d7c0f", "#6d28d9",
  "#a16207"];
const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
  return el;
}

// series: [{name, values, colour, dashed}] over the same points; y from 0 to yMax.
function plot(id, series, yMax) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  svg.setAttribute("viewBox", "0 0 1000 180");
  svg.setAttribute("preserveAspectRatio", "none");
  series.forEach((s) => {
    const n = s.values.length;
    if (!n) { return; }
    const points = s.values.map((v, i) => `${n === 1 ? 500 : (1000 * i) / (n - 1)},${170 - (160 * (v || 0)) / yMax}`);
    const line = svgEl("polyline", { points: points.join(" "), fill: "none", stroke: s.colour, "stroke-width": 2 });
    if (s.dashed) { line.setAttribute("stroke-dasharray", "8 6"); }
    const title = svgEl("title", {});
    title.textContent = s.name;
    line.append(title);
    svg.append(line);
  });
}

// Colour keys under a plot, and what its x axis spans.
function legend(id, series, history) {
  const box = document.getElementById(id);
  box.replaceChildren();
  series.forEach((s) => {
    const key = document.createElement("span");
    key.className = "key";
    key.style.borderColor = s.colour;
    key.textContent = s.name;
    box.append(key);
  });
  if (history.length) {
    const span = document.createElement("span");
    span.className = "muted";
    span.textContent = ` (${history.length} points of ~${history[0].rows} predictions, until ${history[history.length - 1].until})`;
    box.append(span);
  }
}

function row(cells, header) {
  const tr = document.createElement("tr");
  cells.forEach((c) => { const td = document.createElement(header ? "th" : "td"); td.textContent = c; tr.append(td); });
  return tr;
}

function fmt(v) { return typeof v === "number" ? (Math.abs(v) < 0.001 && v !== 0 ? v.toExponential(2) : v.toFixed(4)) : String(v); }

async function refresh() {
  let report;
  const verdict = document.getElementById("verdict");
  try {
    const r = await fetch("/monitor.json");
    report = await r.json();
    if (!r.ok) { verdict.textContent = report.message; return; }
  } catch (err) { verdict.textContent = "The web UI is not reachable."; return; }
  const m = report.model;
  document.getElementById("model").textContent =
    `${m.name}${m.version ? ` v${m.version}` : ""}: ${report.rows} logged predictions in the window (alerts from ${report.thresholds.min_rows})`;
  verdict.className = report.drifted ? "alert" : "ok";
  verdict.textContent = !report.reference ? "this model carries no reference profile: nothing to compare with"
    : report.drifted ? "DRIFT: what the model is shown has moved away from what it was validated on"
      : report.enough_rows ? "no drift" : "too few predictions to judge";
  const table = document.getElementById("statistics");
  table.replaceChildren(row(["statistic", "value", "alert when", "alert"], true));
  Object.entries(report.statistics).forEach(([name, s]) => table.append(row([name, fmt(s.value),
    s.threshold === null ? "" : `${s.alert_when} ${s.threshold}`, s.alert ? "ALERT" : ""])));
  const h = report.history;
  const mix = report.class_names.map((name, i) => ({ name, colour: COLOURS[i], values: h.map((p) => p.class_mix[i]) }));
  const confidence = [{ name: "mean confidence", colour: COLOURS[0], values: h.map((p) => p.confidence) },
    { name: "share not clothing", colour: COLOURS[1], values: h.map((p) => p.ood_share) }];
  const psi = [{ name: "class-mix PSI", colour: COLOURS[3], values: h.map((p) => p.class_mix_psi) },
    { name: `alert threshold ${report.thresholds.psi}`, colour: "#666", dashed: true,
      values: h.map(() => report.thresholds.psi) }];
  const psiMax = Math.max(2 * report.thresholds.psi, ...h.map((p) => p.class_mix_psi));
  [["mix", mix, 1], ["confidence", confidence, 1], ["psi", psi, psiMax]].forEach(([name, series, yMax]) => {
    plot(`plot-${name}`, series, yMax);
    legend(`legend-${name}`, series, h);
  });
  const feedback = document.getElementById("feedback");
  feedback.replaceChildren(row(["model version", "corrections", "accuracy on them"], true));
  report.feedback.forEach((f) => feedback.append(row([f.version, f.feedback, `${(100 * f.accuracy).toFixed(1)} %`])));
}
refresh();
setInterval(refresh, REFRESH_MS);
