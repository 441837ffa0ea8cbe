// The page: send the chosen photos to /v1/predict and show one card per photo.
const input = document.getElementById("files");
const drop = document.getElementById("drop");
const results = document.getElementById("results");
const status = document.getElementById("status");

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function card(file, result) {
  const images = el("div", { className: "images" }, [el("img", { src: URL.createObjectURL(file), alt: file.name })]);
  if (result.heatmap) images.append(el("img", { src: result.heatmap, alt: `What the model looked at in ${file.name}` }));
  if (result.error) {
    return el("li", { className: "card error" }, [
      images,
      el("p", { className: "label", textContent: "Could not read this photo" }),
      el("p", { className: "reason", textContent: result.error.message }),
      el("p", { className: "file", textContent: file.name }),
    ]);
  }
  const percent = Math.round(result.confidence * 100);
  const bar = el("div", { className: "bar" }, [el("div")]);
  bar.firstChild.style.width = `${percent}%`;
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-valuenow", String(percent));
  bar.setAttribute("aria-label", `confidence ${percent}%`);
  const label = result.label.replace(/s$/, "");
  const items = [images, el("p", { className: "label", textContent: label }), bar,
                 el("p", { className: "file", textContent: `${percent}% sure \u00b7 ${file.name}` })];
  if (result.reason) items.push(el("p", { className: "reason", textContent: result.reason }));
  return el("li", { className: "card" }, items);
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

async function classify(files) {
  files = [...files];
  if (!files.length) return;
  status.textContent = `Classifying ${files.length} photo${files.length > 1 ? "s" : ""}\u2026`;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  try {
    const response = await apiFetch("/v1/predict?explain=true", { method: "POST", body: form });
    const body = await response.json();
    if (!body.results) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    body.results.forEach((result, i) => results.prepend(card(files[i], result)));
    const failed = body.results.filter((r) => r.error).length;
    status.textContent = failed ? `${failed} of ${files.length} photos could not be read.` : "Done.";
  } catch (error) {
    status.textContent = `The request failed: ${error.message}`;
  }
}

input.addEventListener("change", () => { classify(input.files); input.value = ""; });
drop.addEventListener("click", (event) => { if (event.target !== input) input.click(); });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); classify(event.dataTransfer.files); });

apiFetch("/v1/model").then((r) => r.json()).then((model) => {
  const accuracy = model.metrics && model.metrics.val_accuracy;
  document.getElementById("model").textContent = `Model ${model.model_id}` +
    (accuracy ? ` \u00b7 validation accuracy ${(accuracy * 100).toFixed(2)}%` : "");
}).catch(() => { document.getElementById("model").textContent = "The model could not be reached."; });
