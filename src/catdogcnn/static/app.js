// The page: photos go to /v1/predict (or, in local mode, to the model running in this browser); one card per
// photo, in the order they were given, a summary line and the labels as CSV.
const $ = (id) => document.getElementById(id);
const results = $("results");
const status = $("status");
let limits = { max_upload_mb: 10, max_megapixels: 40, max_files: 32 };
const REQUEST_BYTES = 8e6; // one slow phone upload of 32 photos would outlast the server's request timeout
let model = null; // what /v1/model says
let local = null; // the model in this browser, once loaded (local.js)
const rows = []; // one per photo, for the summary and the CSV

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

// A server started with an API key answers 401: ask for the key once, keep it for this tab, and try again.
async function apiFetch(url, options = {}) {
  const key = sessionStorage.getItem("apiKey");
  const response = await fetch(url, key ? { ...options, headers: { "X-API-Key": key } } : options);
  if (response.status !== 401) return response;
  const entered = window.prompt("This service needs an API key:");
  if (!entered) return response;
  sessionStorage.setItem("apiKey", entered);
  return apiFetch(url, options);
}

const SINGULAR = { cats: "cat", dogs: "dog" };
const named = (label) => SINGULAR[label] || label;
const classesInWords = () => (model ? model.classes : ["cats", "dogs"])
  .map((c) => (SINGULAR[c] ? `a ${SINGULAR[c]}` : c)).join(" or ");

// Why a photo could not be labelled, in words, by the HTTP status its error carries.
const WHY = {
  401: "This service needs an API key",
  408: "The upload took too long: try again",
  413: "Too large",
  415: "Not a photo",
  422: "Could not read this photo",
  503: "The server is busy: try again in a moment",
};

function details(summary, text) {
  return el("details", { className: "details" }, [el("summary", { textContent: summary }),
    el("p", { textContent: text })]);
}

function fill(item, file, result) {
  const photo = el("img", { src: URL.createObjectURL(file), alt: file.name });
  photo.addEventListener("error", () => photo.remove()); // not a picture the browser can show
  const images = el("div", { className: "images" }, [photo]);
  const row = { file: file.name, label: "", confidence: "", p_neither: "", error: "" };
  let children;
  if (result.error) {
    item.className = "card error";
    row.error = result.error.message;
    children = [images, el("p", { className: "label", textContent: WHY[result.error.status] || "Could not label this photo" }),
      el("p", { className: "file", textContent: file.name }), details("Why", result.error.message)];
  } else if (result.label === "neither") {
    item.className = "card neither";
    children = [images, el("p", { className: "label", textContent: `This doesn't look like ${classesInWords()}` }),
      el("p", { className: "file", textContent: file.name }),
      details("Scores", `${Math.round(result.neither_probability * 100)}% likely to show neither. ${result.reason || ""}`)];
  } else {
    item.className = "card";
    if (result.heatmap) {
      images.append(el("figure", {}, [el("img", { src: result.heatmap, alt: `What the model looked at in ${file.name}` }),
        el("figcaption", { textContent: "What the model looked at" })]));
    }
    const percent = Math.round(result.confidence * 100);
    const bar = el("div", { className: "bar" }, [el("div")]);
    bar.firstChild.style.width = `${percent}%`;
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("aria-label", `confidence ${percent}%`);
    const scores = Object.entries(result.probabilities || {}).map(([c, p]) => `${c} ${(p * 100).toFixed(1)}%`);
    if (result.neither_probability != null) scores.push(`neither ${(result.neither_probability * 100).toFixed(1)}%`);
    children = [images, el("p", { className: "label", textContent: named(result.label) }), bar,
      el("p", { className: "file", textContent: `${percent}% sure \u00b7 ${file.name}` }), details("Scores", scores.join(", "))];
  }
  if (!result.error) {
    Object.assign(row, { label: result.label, confidence: result.confidence.toFixed(6),
      p_neither: result.neither_probability == null ? "" : result.neither_probability.toFixed(6) });
  }
  item.replaceChildren(...children);
  rows.push(row);
}

function summarise() {
  const counts = {};
  for (const row of rows) {
    const key = row.error ? "not labelled" : row.label;
    counts[key] = (counts[key] || 0) + 1;
  }
  $("counts").textContent = Object.entries(counts)
    .map(([label, n]) => `${n} ${n === 1 ? named(label) : label}`).join(", ") + ". ";
  const quote = (value) => `"${String(value).replaceAll('"', '""')}"`;
  const csv = ["file,label,confidence,p_neither,error", ...rows.map((r) =>
    [r.file, r.label, r.confidence, r.p_neither, r.error].map(quote).join(","))].join("\n") + "\n";
  const link = $("csv");
  URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
  $("summary").hidden = false;
}

async function labelOnServer(files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const response = await apiFetch("v1/predict?explain=true", { method: "POST", body: form });
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
  if (body && body.results) return body.results;
  const error = { status: response.status, message: body && body.error ? body.error.message : `HTTP ${response.status}` };
  return files.map(() => ({ error }));
}

async function classify(given) {
  const files = [...given];
  if (!files.length) return;
  const items = files.map((file) => results.appendChild(el("li", { className: "card pending" },
    [el("p", { className: "file", textContent: `${file.name}\u2026` })])));
  status.textContent = `Labelling ${files.length} photo${files.length > 1 ? "s" : ""}${local ? " on this device" : ""}\u2026`;
  let failed = 0;
  const turns = []; // requests of at most max_files photos and REQUEST_BYTES, so that each arrives in good time
  for (const file of files) {
    const last = turns[turns.length - 1];
    const full = !last || last.length >= limits.max_files || last.reduce((n, f) => n + f.size, 0) + file.size > REQUEST_BYTES;
    if (full) turns.push([file]); else last.push(file);
  }
  let start = 0;
  for (const chunk of turns) {
    let answers;
    try {
      answers = local ? await Promise.all(chunk.map((file) => local.label(file))) : await labelOnServer(chunk);
    } catch (error) {
      answers = chunk.map(() => ({ error: { status: 0, message: `The request failed: ${error.message}` } }));
    }
    answers.forEach((answer, i) => { failed += Boolean(answer.error); fill(items[start + i], chunk[i], answer); });
    start += chunk.length;
    summarise();
  }
  status.textContent = failed ? `${failed} of ${files.length} photos could not be labelled.` : "Done.";
}

const input = $("files");
const drop = $("drop");
for (const picker of [input, $("camera")]) {
  picker.addEventListener("change", () => { classify(picker.files); picker.value = ""; });
}
drop.addEventListener("click", (event) => { if (!event.target.closest("label, input")) input.click(); });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); classify(event.dataTransfer.files); });
document.addEventListener("paste", (event) => {
  const pasted = [...event.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  if (pasted.length) { event.preventDefault(); classify(pasted); }
});

$("local").addEventListener("change", async (event) => {
  const note = $("local-status");
  if (!event.target.checked) { local = null; note.textContent = ""; return; }
  note.textContent = "Loading the model into this browser\u2026";
  try {
    const { loadLocalModel } = await import("./local.js");
    local = await loadLocalModel(apiFetch);
    note.textContent = `Ready: ${local.threads} thread${local.threads > 1 ? "s" : ""}; nothing is uploaded.`;
  } catch (error) {
    event.target.checked = false;
    note.textContent = `Local mode is not available here: ${error.message}`;
  }
});

apiFetch("v1/limits").then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`)))).then((given) => {
  limits = given;
  if (limits.local_only) { // a static copy of the page (`catdogcnn export-web`): no server to send photos to
    $("limits").textContent = "JPEG, PNG, WebP, AVIF, GIF; labelled in this browser, nothing uploaded; you can " +
      "also paste a photo.";
    const toggle = $("local");
    toggle.checked = true;
    toggle.disabled = true;
    toggle.dispatchEvent(new Event("change"));
    return;
  }
  $("limits").textContent = `JPEG, PNG, HEIC, WebP, AVIF, GIF, TIFF; up to ${limits.max_upload_mb} MB and ` +
    `${limits.max_megapixels} megapixels a photo; ${limits.max_files} photos at a time (more are sent in turns); ` +
    "you can also paste a photo.";
}).catch(() => {});
apiFetch("v1/model").then((r) => r.json()).then((given) => {
  model = given;
  const accuracy = model.metrics && model.metrics.val_accuracy;
  $("model").textContent = `Model ${model.model_id}` +
    (accuracy ? ` \u00b7 validation accuracy ${(accuracy * 100).toFixed(2)}%` : "");
}).catch(() => { $("model").textContent = "The model could not be reached."; });
