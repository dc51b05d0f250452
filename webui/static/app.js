// Upload UI: posts images to /predict and draws each answer with a bar chart of the ten probabilities.
"use strict";

const form = document.getElementById("upload-form");
const input = document.getElementById("files");
const dropzone = document.getElementById("dropzone");
const message = document.getElementById("message");
const results = document.getElementById("results");
const HEALTH_POLL_MS = 10000;
// Form posts repeat the token of the page's cookie (the server's CSRF check).
const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

function showMessage(text) { message.textContent = text || ""; }

let headerVersion = null;  // the version the header names; a prediction from another one refreshes it

function modelLabel(model) {
  if (!model || !model.name) { return "an unnamed model"; }
  return model.version ? `${model.name} v${model.version}` : model.name;
}

function card(result, previewUrl, classNames, model) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.prediction = result.class_name;
  const head = document.createElement("header");
  const img = document.createElement("img");
  img.src = previewUrl;
  img.alt = result.filename;
  const text = document.createElement("div");
  const name = document.createElement("div");
  name.className = "muted";
  name.textContent = result.filename;
  const prediction = document.createElement("div");
  prediction.className = "prediction";
  const guess = `${result.class_name} (${(100 * result.probability).toFixed(1)} %)`;
  // in_distribution is false when the picture does not look like clothing; null from older models
  const notClothing = result.in_distribution === false;
  prediction.textContent = notClothing ? "This does not look like a clothing item" : guess;
  const answeredBy = document.createElement("div");
  answeredBy.className = "muted answered-by";
  answeredBy.textContent = `answered by ${modelLabel(model)}`;
  text.append(name, prediction);
  if (notClothing) {
    el.classList.add("not-clothing");
    const bestGuess = document.createElement("div");
    bestGuess.className = "muted best-guess";
    bestGuess.textContent = `the model's best guess, if it were one: ${guess}`;
    text.append(bestGuess);
  }
  text.append(answeredBy);
  head.append(img);
  if (result.seen) {  // what the model classified after preprocessing: 28x28, shown enlarged
    const seen = document.createElement("img");
    seen.className = "seen";
    seen.src = result.seen;
    seen.alt = "what the model saw (28x28)";
    seen.title = "what the model saw: 28x28 after preprocessing";
    head.append(seen);
  }
  head.append(text);
  const chart = document.createElement("div");
  chart.className = "chart";
  result.probabilities.forEach((p, i) => {
    const row = document.createElement("div");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.textContent = classNames[i];
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = i === result.class_index ? "bar top" : "bar";
    bar.style.width = `${Math.max(0.5, 100 * p)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(label, track, value);
    chart.append(row);
  });
  el.append(head, chart);
  if (result.prediction_id) { el.append(feedbackForm(result, classNames)); }
  return el;
}

// "Wrong? Pick the right class": a labelled select and a button, so the keyboard alone can send a correction.
function feedbackForm(result, classNames) {
  const form = document.createElement("form");
  form.className = "feedback";
  const id = `fb-${result.prediction_id}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = "Wrong? Pick the right class: ";
  const select = document.createElement("select");
  select.id = id;
  classNames.forEach((name, i) => {
    const option = new Option(name, String(i), false, i === result.class_index);
    select.append(option);
  });
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = "Send correction";
  const status = document.createElement("span");
  status.className = "muted feedback-status";
  status.setAttribute("role", "status");
  form.append(label, select, send, status);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    status.textContent = "Sending\u2026";
    try {
      const r = await fetch("/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken },
        body: JSON.stringify({ prediction_id: result.prediction_id, label: Number(select.value) }),
      });
      const answer = await r.json();
      status.textContent = r.ok ? `Thanks: recorded as ${answer.label}` : answer.message;
    } catch (err) { status.textContent = "The web UI is not reachable."; }
  });
  return form;
}

async function classify(files) {
  if (!files.length) { return; }
  showMessage("Classifying\u2026");
  const body = new FormData();
  for (const f of files) { body.append("files", f, f.name); }
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body, headers: { "X-CSRF-Token": csrfToken } });
  } catch (err) {
    showMessage("The web UI is not reachable.");
    return;
  }
  const payload = await response.json().catch(() => ({ error: `request failed (${response.status})` }));
  if (!response.ok) { showMessage(payload.message || `request failed (${response.status})`); return; }
  showMessage("");
  payload.results.forEach((result, i) => {
    results.prepend(card(result, URL.createObjectURL(files[i]), payload.class_names, payload.model));
  });
  if (payload.model && payload.model.version !== headerVersion) { refreshStatus(); }
}

input.addEventListener("change", () => { classify(Array.from(input.files)); input.value = ""; });
form.addEventListener("submit", (e) => { e.preventDefault(); classify(Array.from(input.files)); });
["dragenter", "dragover"].forEach((t) => dropzone.addEventListener(t, (e) => {
  e.preventDefault(); dropzone.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => dropzone.addEventListener(t, (e) => {
  e.preventDefault(); dropzone.classList.remove("over");
}));
dropzone.addEventListener("drop", (e) => classify(Array.from(e.dataTransfer.files)));

document.querySelectorAll(".sample").forEach((button) => button.addEventListener("click", async () => {
  const blob = await (await fetch(`/samples/${button.dataset.index}.png`)).blob();
  classify([new File([blob], `test image: ${button.title}.png`, { type: "image/png" })]);
}));

async function refreshStatus() {
  const info = document.getElementById("model-info");
  try {
    const r = await fetch("/model_info");
    const m = await r.json();
    if (r.ok) {
      const details = [];
      if (m.stage) { details.push(`stage ${m.stage}`); }
      (m.aliases || []).forEach((a) => details.push(`alias @${a}`));
      if (m.metrics && m.metrics.test_accuracy) {
        details.push(`test accuracy ${(100 * m.metrics.test_accuracy).toFixed(2)} %`);
      }
      if (m.metrics && m.metrics.test_ece !== undefined) {  // how far shown percentages are from the truth
        details.push(`calibration error ${(100 * m.metrics.test_ece).toFixed(1)} %`);
      }
      headerVersion = m.version || null;
      info.textContent = `model: ${modelLabel(m)}${details.length ? ` (${details.join(", ")})` : ""}`;
    } else { info.textContent = `model: ${m.message}`; }
  } catch (err) { info.textContent = "model: unknown"; }
  try {
    const h = await fetch("/health");
    document.getElementById("health").textContent =
      h.ok ? "scoring server: ok" : "scoring server: unreachable (predictions will fail until it is back)";
  } catch (err) { document.getElementById("health").textContent = "web UI: unreachable"; }
}
refreshStatus();
setInterval(refreshStatus, HEALTH_POLL_MS);
