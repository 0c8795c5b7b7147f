// The explanation page. Uses only the public HTTP API: GET /models, POST /jobs, GET /jobs/{id}.
// Heatmaps are drawn here with the rules documented in service/web/render.py (colormap loaded from
// /static/colormap.json, so the page and the PNG endpoint share one definition).
"use strict";

const MAX_OVERLAY_PIXELS = 4_000_000; // larger images get a proportionally coarser overlay canvas
const POLL_MS = [250, 250, 500, 500, 1000];

const $ = (id) => document.getElementById(id);

const state = {
  file: null,
  stops: null, // [[t, [r, g, b]], ...]
  models: [],
  apiKey: sessionStorage.getItem("exclip-api-key") || "",
  job: null,
  captions: [], // decoded CaptionResult objects with .matrix (Float64Array T*R*C)
  current: 0, // caption index shown
  selection: null, // {start, end} token range, end exclusive; null = whole caption
  anchor: null,
  focus: 0,
  box: null, // [x0, y0, x1, y1] in original pixels
  highlight: null, // {caption, start, end}: an example's phrase to select once its result arrives
};

// ---------- colormap and geometry (same rules as render.py) ----------

function symmetricLimit(values) {
  let m = 0;
  for (const v of values) m = Math.max(m, Math.abs(v));
  return m > 0 ? m : 1;
}

// Writes the colour of value into out[o], out[o + 1], out[o + 2] (no allocation: used per pixel).
function colourInto(out, o, value, limit) {
  const stops = state.stops;
  const t = Math.min(1, Math.max(-1, value / limit));
  let i = 0;
  while (i < stops.length - 2 && t > stops[i + 1][0]) i++;
  const t0 = stops[i][0], c0 = stops[i][1], t1 = stops[i + 1][0], c1 = stops[i + 1][1];
  const f = (t - t0) / (t1 - t0);
  for (let k = 0; k < 3; k++) out[o + k] = Math.floor(c0[k] + (c1[k] - c0[k]) * f + 0.5);
}

function colormap(value, limit) {
  const rgb = [0, 0, 0];
  colourInto(rgb, 0, value, limit);
  return rgb;
}

function cssColour(rgb) {
  return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
}

// Per-axis bilinear lookup: pixel centre -> (inside, lower index, upper index, fraction).
function axisTable(n, scale, start, end, cells) {
  const inside = new Uint8Array(n), i0 = new Int32Array(n), i1 = new Int32Array(n), frac = new Float64Array(n);
  const cell = (end - start) / cells;
  for (let p = 0; p < n; p++) {
    const centre = (p + 0.5) / scale;
    inside[p] = centre >= start && centre < end ? 1 : 0;
    const u = Math.min(cells - 1, Math.max(0, (centre - start) / cell - 0.5));
    i0[p] = Math.floor(u);
    i1[p] = Math.min(i0[p] + 1, cells - 1);
    frac[p] = u - i0[p];
  }
  return { inside, i0, i1, frac };
}

function drawOverlay(canvas, heat, cap) {
  const { width, height, crop_box: crop } = cap.image;
  const { rows, cols } = cap.grid;
  const scale = Math.min(1, Math.sqrt(MAX_OVERLAY_PIXELS / (width * height)));
  const cw = Math.max(1, Math.round(width * scale));
  const ch = Math.max(1, Math.round(height * scale));
  canvas.width = cw;
  canvas.height = ch;
  const limit = symmetricLimit(heat);
  const xs = axisTable(cw, scale, crop[0], crop[2], cols);
  const ys = axisTable(ch, scale, crop[1], crop[3], rows);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cw, ch);
  const data = img.data;
  for (let y = 0; y < ch; y++) {
    if (!ys.inside[y]) continue;
    const r0 = ys.i0[y] * cols, r1 = ys.i1[y] * cols, fv = ys.frac[y];
    for (let x = 0; x < cw; x++) {
      if (!xs.inside[x]) continue;
      const c0 = xs.i0[x], c1 = xs.i1[x], fu = xs.frac[x];
      const top = heat[r0 + c0] * (1 - fu) + heat[r0 + c1] * fu;
      const bottom = heat[r1 + c0] * (1 - fu) + heat[r1 + c1] * fu;
      const o = (y * cw + x) * 4;
      colourInto(data, o, top * (1 - fv) + bottom * fv, limit);
      data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  return limit;
}

// Sum of the selected tokens' rows of the interaction matrix (all tokens when nothing is selected).
function spanHeatmap(cap, sel) {
  const { rows, cols } = cap.grid;
  const n = rows * cols;
  const heat = new Float64Array(n);
  const start = sel ? sel.start : 0;
  const end = sel ? sel.end : cap.tokens.length;
  for (let t = start; t < end; t++) {
    for (let k = 0; k < n; k++) heat[k] += cap.matrix[t * n + k];
  }
  return heat;
}

// Covered fraction of each patch, as attribution ImageGeometry.box_to_patch_weights: the box is first
// clipped to the image, then each patch weighs the fraction of its area the clipped box covers.
function boxWeights(cap, box) {
  const { rows, cols } = cap.grid;
  const { width, height, crop_box: crop, patch_size: [pw, ph] } = cap.image;
  const bx0 = Math.max(box[0], 0), by0 = Math.max(box[1], 0);
  const bx1 = Math.min(box[2], width), by1 = Math.min(box[3], height);
  const w = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const py0 = crop[1] + r * ph;
    const fy = Math.max(0, Math.min(by1, py0 + ph) - Math.max(by0, py0)) / ph;
    for (let c = 0; c < cols; c++) {
      const px0 = crop[0] + c * pw;
      const fx = Math.max(0, Math.min(bx1, px0 + pw) - Math.max(bx0, px0)) / pw;
      w[r * cols + c] = fx * fy;
    }
  }
  return w;
}

function boxTokenScores(cap, box) {
  const w = boxWeights(cap, box);
  const n = w.length;
  return cap.tokens.map((_, t) => {
    let s = 0;
    for (let k = 0; k < n; k++) s += w[k] * cap.matrix[t * n + k];
    return s;
  });
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, message, field, type) {
    super(message);
    this.status = status;
    this.field = field;
    this.type = type;
  }
}

const FIELD_BY_NAME = {
  image: "image", caption: "captions", captions: "captions", model: "model", steps: "steps",
  span: "captions", tokens: "captions", token_range: "captions", box: "box",
};

// Which form field an error message concerns (FastAPI "loc" when given, else words in the message).
function fieldFor(status, message, loc) {
  if (status === 401) return "key";
  if (status === 413) return "image";
  if (Array.isArray(loc)) {
    for (const part of loc) if (FIELD_BY_NAME[part]) return FIELD_BY_NAME[part];
  }
  const m = message.toLowerCase();
  if (/image|decode|pixel|upload|file/.test(m)) return "image";
  if (/caption|token|context length/.test(m)) return "captions";
  if (/steps?\b/.test(m)) return "steps";
  if (/model|pretrained|checkpoint/.test(m)) return "model";
  return "general";
}

const FIELD_BY_TYPE = {
  InvalidImage: "image", EmptyCaption: "captions", CaptionTooLong: "captions", CaptionError: "captions",
  InvalidOption: "steps", UnknownModel: "model", ModelNotAvailable: "model", UnsupportedModel: "model",
  InvalidSelection: "box",
};

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (err) {
    throw new ApiError(0, `The service could not be reached (${err.message}).`, "general");
  }
  if (response.ok) return response.json();
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch (_) {
    detail = null;
  }
  let message, loc;
  if (Array.isArray(detail)) {
    // FastAPI validation errors: list of {loc, msg}.
    message = detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
    loc = detail[0] && detail[0].loc;
  } else {
    message = typeof detail === "string" ? detail : `The service answered ${response.status} ${response.statusText}.`;
  }
  if (response.status === 401) {
    message = state.apiKey
      ? `The API key was not accepted (${message}). Check it.`
      : "This service needs an API key: enter it here.";
  }
  throw new ApiError(response.status, message, fieldFor(response.status, message, loc));
}

// ---------- errors next to their fields ----------

const ERROR_FIELDS = ["image", "captions", "model", "steps", "key", "box", "general"];

function clearErrors() {
  for (const f of ERROR_FIELDS) {
    $(`error-${f}`).textContent = "";
    $(`field-${f}`)?.classList.remove("invalid");
  }
}

function showError(field, message) {
  if (field === "key") revealKeyField();
  const el = $(`error-${field}`) || $("error-general");
  el.textContent = message.charAt(0).toUpperCase() + message.slice(1);
  $(`field-${field}`)?.classList.add("invalid");
}

function revealKeyField() {
  $("field-key").hidden = false;
  $("api-key").value = state.apiKey;
  $("api-key").focus();
}

// ---------- models ----------

async function loadModels() {
  try {
    const body = await api("/models");
    state.models = body.models || [];
    const select = $("model");
    select.replaceChildren();
    for (const m of state.models) {
      const option = document.createElement("option");
      option.value = m.name;
      // A checkpoint path is shown by its file name; the full value is in the tooltip.
      const weights = m.pretrained ? m.pretrained.split("/").pop() : "random weights";
      option.textContent = `${m.name} (${weights})${m.demo ? " — demo model" : ""}`;
      option.title = m.pretrained || "random weights";
      select.append(option);
    }
    if (body.default) select.value = body.default;
    showDemoNote();
    $("error-model").textContent = "";
  } catch (err) {
    showError(err.field === "key" ? "key" : "model", err.message);
  } finally {
    applyStepRange();
  }
}

// Steps range from the chosen model's options (GET /models), e.g. {"steps": {"min", "max", "default"}}.
function applyStepRange() {
  const model = state.models.find((m) => m.name === $("model").value);
  const steps = model && model.options && model.options.steps;
  const input = $("steps");
  if (steps && typeof steps === "object") {
    if (steps.min !== undefined) input.min = steps.min;
    if (steps.max !== undefined) input.max = steps.max;
    if (!input.value && steps.default !== undefined) input.value = steps.default;
  }
  if (!input.value) input.value = 10;
}

// A demo model (trained on synthetic scenes) says so, with its description from GET /models.
function showDemoNote() {
  const model = state.models.find((m) => m.name === $("model").value);
  const note = $("demo-note");
  note.hidden = !(model && model.demo);
  note.textContent = model && model.demo ? model.description || `${model.name} is a demo model.` : "";
}

// ---------- example scenes (static/examples, written by scripts/make_examples.py) ----------

async function loadExamples() {
  let examples = [];
  try {
    const response = await fetch("/static/examples/examples.json");
    if (response.ok) examples = (await response.json()).examples || [];
  } catch {
    examples = []; // the examples are optional: the page works without them
  }
  const list = $("examples");
  list.replaceChildren();
  for (const ex of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example secondary";
    button.dataset.file = ex.file;
    const img = document.createElement("img");
    img.src = `/static/examples/${ex.file}`;
    img.alt = "";
    const text = document.createElement("span");
    text.textContent = ex.caption;
    button.append(img, text);
    button.addEventListener("click", () => runExample(ex));
    list.append(button);
  }
  $("field-examples").hidden = examples.length === 0;
}

// One click: the example's image and caption, the demo model if one is served, explain, then show the
// heatmap of the example's highlighted phrase.
async function runExample(ex) {
  const blob = await (await fetch(`/static/examples/${ex.file}`)).blob();
  setFile(new File([blob], ex.file, { type: "image/png" }));
  $("captions").value = ex.caption;
  const demo = state.models.find((m) => m.demo);
  if (demo) {
    $("model").value = demo.name;
    applyStepRange();
    showDemoNote();
  }
  const phrase = (ex.phrases || []).find((p) => p.text === ex.highlight);
  state.highlight = phrase ? { caption: ex.caption, start: phrase.start, end: phrase.end } : null;
  $("explain-form").requestSubmit();
}

function selectHighlight() {
  const h = state.highlight;
  state.highlight = null;
  const cap = state.captions[0];
  if (!h || !cap || cap.caption !== h.caption) return;
  const inside = [];
  cap.tokens.forEach((t, i) => {
    if (t.end > t.start && t.start >= h.start && t.end <= h.end) inside.push(i);
  });
  if (inside.length) select(inside[0], inside[inside.length - 1]);
}

// ---------- image input ----------

function setFile(file) {
  state.file = file;
  $("file-name").textContent = file ? `${file.name} (${Math.round(file.size / 1024)} KiB)` : "";
  $("error-image").textContent = "";
  $("field-image").classList.remove("invalid");
  clearResult();
  if (!file) return;
  const photo = $("photo");
  $("stage-empty").textContent = "Loading the image…";
  photo.onload = () => {
    $("stage").hidden = false;
    $("stage-empty").hidden = true;
    fitStage();
  };
  photo.onerror = () => {
    $("stage").hidden = true;
    $("stage-empty").hidden = false;
    $("stage-empty").textContent = "This browser cannot show this file; the service will say whether it can read it.";
  };
  if (photo.src) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
}

function setupDropzone() {
  const zone = $("dropzone");
  $("image-input").addEventListener("change", (e) => setFile(e.target.files[0] || null));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("drag");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("drag"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("drag");
    if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
  });
}

// Show the image as large as the viewer allows (small images are scaled up), keeping its aspect ratio.
function fitStage() {
  const photo = $("photo");
  if (!photo.naturalWidth) return;
  const availW = $("stage-wrap").clientWidth;
  const availH = Math.max(200, window.innerHeight * 0.75);
  const s = Math.min(availW / photo.naturalWidth, availH / photo.naturalHeight);
  photo.style.width = `${Math.floor(photo.naturalWidth * s)}px`;
}

// ---------- explain: submit and poll ----------

function showProgress(text) {
  $("progress").hidden = !text;
  $("progress-text").textContent = text || "";
}

async function explain(event) {
  event.preventDefault();
  clearErrors();
  if (!$("field-key").hidden) state.apiKey = $("api-key").value.trim();
  const captions = $("captions").value.split("\n").map((c) => c.trim()).filter((c) => c);
  let ok = true;
  if (!state.file) {
    showError("image", "Choose or drop an image first.");
    ok = false;
  }
  if (!captions.length) {
    showError("captions", "Type at least one caption (one per line).");
    ok = false;
  }
  if (!ok) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const c of captions) form.append("caption", c);
  if ($("model").value) form.append("model", $("model").value);
  if ($("steps").value) form.append("steps", $("steps").value);
  form.append("format", "json");
  const button = $("explain-button");
  button.disabled = true;
  const started = performance.now();
  try {
    showProgress("Submitting…");
    let job = await api("/jobs", { method: "POST", body: form });
    for (let i = 0; job.status === "queued" || job.status === "running"; i++) {
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      showProgress(`${job.status === "queued" ? "Queued" : "Running"}… ${secs} s`);
      await new Promise((r) => setTimeout(r, POLL_MS[Math.min(i, POLL_MS.length - 1)]));
      job = await api(`/jobs/${encodeURIComponent(job.id)}`);
    }
    if (job.status === "done") {
      showProgress("");
      showJob(job);
    } else if (job.status === "failed") {
      const e = job.error || { type: "", message: "The job failed without a message." };
      throw new ApiError(200, e.message, FIELD_BY_TYPE[e.type] || fieldFor(200, e.message), e.type);
    } else {
      throw new ApiError(200, `The job was ${job.status}.`, "general");
    }
  } catch (err) {
    showProgress("");
    showError(err.field || "general", err.message);
  } finally {
    button.disabled = false;
  }
}

// ---------- result ----------

function decodeMatrix(cap) {
  const { rows, cols } = cap.grid;
  const m = cap.interactions;
  if (Array.isArray(m)) {
    const out = new Float64Array(m.length * rows * cols);
    let o = 0;
    for (const tok of m) for (const row of tok) for (const v of row) out[o++] = v;
    return out;
  }
  // {"encoding": "base64-float32-le", "shape": [T, R, C], "data": "..."}
  const bytes = Uint8Array.from(atob(m.data), (ch) => ch.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = new Float64Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

function clearResult() {
  state.job = null;
  state.captions = [];
  state.box = null;
  $("result").hidden = true;
  $("viewer-controls").hidden = true;
  $("box-rect").hidden = true;
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function showJob(job) {
  state.job = job;
  $("result").dataset.jobId = job.id;
  state.captions = job.result.captions.map((c) => Object.assign({}, c, { matrix: decodeMatrix(c) }));
  const select = $("caption-select");
  select.replaceChildren();
  state.captions.forEach((c, i) => {
    const option = document.createElement("option");
    option.value = i;
    option.textContent = c.caption;
    select.append(option);
  });
  $("caption-picker").hidden = state.captions.length < 2;
  $("result").hidden = false;
  $("viewer-controls").hidden = false;
  state.box = null;
  showCaption(0);
  selectHighlight();
}

function showCaption(index) {
  state.current = index;
  state.selection = null;
  state.anchor = null;
  state.focus = 0;
  $("caption-select").value = index;
  const cap = state.captions[index];
  $("score").textContent = cap.score.toFixed(4);
  $("gap").textContent = cap.completeness.gap.toPrecision(3);
  // Newer results also give the gap of the numerical integration alone (it shrinks as steps grow).
  const integration = cap.completeness.integration_gap;
  $("integration-gap-row").hidden = integration === undefined;
  $("integration-gap").textContent = integration === undefined ? "" : integration.toPrecision(3);
  $("totals").textContent = `${cap.completeness.total.toPrecision(4)} / ${cap.completeness.expected.toPrecision(4)}`;
  renderTokens();
  updateOverlay();
  updateBox();
}

const SPECIAL_LABELS = { "<start_of_text>": "⟨start⟩", "<end_of_text>": "⟨end⟩" };

function tokenLabel(tok) {
  return SPECIAL_LABELS[tok.text] || tok.text;
}

function renderTokens() {
  const cap = state.captions[state.current];
  const list = $("tokens");
  list.replaceChildren();
  cap.tokens.forEach((tok, i) => {
    const el = document.createElement("span");
    el.className = "token" + (tok.text in SPECIAL_LABELS ? " special" : "");
    el.setAttribute("role", "option");
    el.dataset.index = i;
    el.id = `token-${i}`;
    el.textContent = tokenLabel(tok);
    el.tabIndex = i === state.focus ? 0 : -1;
    list.append(el);
  });
  paintTokens();
}

function paintTokens() {
  const cap = state.captions[state.current];
  const scores = state.box ? boxTokenScores(cap, state.box) : null;
  const limit = scores ? symmetricLimit(scores) : 1;
  for (const el of $("tokens").children) {
    const i = Number(el.dataset.index);
    const selected = state.selection && i >= state.selection.start && i < state.selection.end;
    el.setAttribute("aria-selected", selected ? "true" : "false");
    el.tabIndex = i === state.focus ? 0 : -1;
    if (scores) {
      const rgb = colormap(scores[i], limit);
      el.style.backgroundColor = cssColour(rgb);
      el.style.color = Math.abs(scores[i] / limit) > 0.6 ? "#fff" : "#111";
      el.dataset.score = scores[i];
      el.title = `box score ${scores[i].toPrecision(4)}`;
    } else {
      el.style.backgroundColor = "";
      el.style.color = "";
      delete el.dataset.score;
      el.title = "";
    }
  }
  const legend = $("token-legend");
  legend.hidden = !scores;
  if (scores) fillLegend(legend, limit);
}

function fillLegend(container, limit) {
  const bar = container.querySelector(".legend-bar");
  const ctx = bar.getContext("2d");
  const img = ctx.createImageData(bar.width, 1);
  for (let x = 0; x < bar.width; x++) {
    const rgb = colormap(-limit + (2 * limit * (x + 0.5)) / bar.width, limit);
    img.data.set([rgb[0], rgb[1], rgb[2], 255], x * 4);
  }
  ctx.putImageData(img, 0, 0);
  container.querySelector(".lo").textContent = (-limit).toPrecision(3);
  container.querySelector(".mid").textContent = "0";
  container.querySelector(".hi").textContent = limit.toPrecision(3);
  container.dataset.limit = limit;
}

function updateOverlay() {
  const cap = state.captions[state.current];
  const limit = drawOverlay($("overlay"), spanHeatmap(cap, state.selection), cap);
  fillLegend($("overlay-legend"), limit);
  const sel = state.selection;
  const text = sel
    ? cap.tokens.slice(sel.start, sel.end).map(tokenLabel).join(" ")
    : "";
  const which = sel && sel.end - sel.start > 1 ? `tokens ${sel.start}–${sel.end - 1}` : `token ${sel && sel.start}`;
  $("showing").textContent = sel
    ? `Heatmap of ${which}: “${text}”`
    : "Heatmap of the whole caption (all tokens). Select tokens to narrow it.";
  $("overlay").dataset.selection = sel ? `${sel.start}:${sel.end}` : "";
}

// ---------- token selection (mouse drag, keyboard) ----------

function select(a, b) {
  state.selection = { start: Math.min(a, b), end: Math.max(a, b) + 1 };
  paintTokens();
  updateOverlay();
}

function focusToken(i) {
  const n = state.captions[state.current].tokens.length;
  state.focus = Math.max(0, Math.min(n - 1, i));
  paintTokens();
  $(`token-${state.focus}`).focus();
}

function setupTokens() {
  const list = $("tokens");
  let dragging = false;
  const indexAt = (e) => {
    const el = document.elementFromPoint(e.clientX, e.clientY);
    return el && el.classList.contains("token") && list.contains(el) ? Number(el.dataset.index) : null;
  };
  list.addEventListener("pointerdown", (e) => {
    const i = indexAt(e);
    if (i === null) return;
    e.preventDefault();
    dragging = true;
    if (e.shiftKey && state.anchor !== null) {
      select(state.anchor, i);
    } else {
      state.anchor = i;
      select(i, i);
    }
    focusToken(i);
  });
  list.addEventListener("pointermove", (e) => {
    if (!dragging) return;
    const i = indexAt(e);
    if (i !== null && state.anchor !== null) {
      select(state.anchor, i);
      state.focus = i;
    }
  });
  window.addEventListener("pointerup", () => {
    dragging = false;
  });
  // Focus can arrive by Tab or a click; the focused token is where keyboard selection starts.
  list.addEventListener("focusin", (e) => {
    if (!e.target.classList.contains("token")) return;
    state.focus = Number(e.target.dataset.index);
    for (const el of list.children) el.tabIndex = el === e.target ? 0 : -1;
  });
  list.addEventListener("keydown", (e) => {
    const i = state.focus;
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      e.preventDefault();
      const next = i + (e.key === "ArrowRight" ? 1 : -1);
      if (e.shiftKey) {
        if (state.anchor === null) state.anchor = i;
        focusToken(next);
        select(state.anchor, state.focus);
      } else {
        focusToken(next);
      }
    } else if (e.key === "Home" || e.key === "End") {
      e.preventDefault();
      focusToken(e.key === "Home" ? 0 : Infinity);
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      state.anchor = i;
      select(i, i);
    } else if (e.key === "Escape") {
      state.selection = null;
      state.anchor = null;
      paintTokens();
      updateOverlay();
    }
  });
}

// ---------- box drawing ----------

function toImageCoords(e) {
  const rect = $("stage").getBoundingClientRect();
  const cap = state.captions[state.current];
  const fx = Math.min(1, Math.max(0, (e.clientX - rect.left) / rect.width));
  const fy = Math.min(1, Math.max(0, (e.clientY - rect.top) / rect.height));
  return [fx * cap.image.width, fy * cap.image.height];
}

function normaliseBox(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function round2(v) {
  return Math.round(v * 100) / 100;
}

function setBox(box) {
  $("error-box").textContent = "";
  if (box && boxWeights(state.captions[state.current], box).every((w) => w === 0)) {
    const crop = state.captions[state.current].image.crop_box.map((v) => Math.round(v));
    $("error-box").textContent = `The box does not overlap the part of the image the model sees ` +
      `(x ${crop[0]}–${crop[2]}, y ${crop[1]}–${crop[3]}); draw it inside that region.`;
    box = null;
  }
  state.box = box;
  updateBox();
  paintTokens();
}

function updateBox() {
  const rect = $("box-rect");
  const box = state.box;
  ["x0", "y0", "x1", "y1"].forEach((k, i) => {
    $(`box-${k}`).value = box ? round2(box[i]) : "";
  });
  if (!box || !state.captions.length) {
    rect.hidden = true;
    return;
  }
  const { width, height } = state.captions[state.current].image;
  rect.hidden = false;
  rect.style.left = `${(100 * box[0]) / width}%`;
  rect.style.top = `${(100 * box[1]) / height}%`;
  rect.style.width = `${(100 * (box[2] - box[0])) / width}%`;
  rect.style.height = `${(100 * (box[3] - box[1])) / height}%`;
}

function setupBox() {
  const stage = $("stage");
  let start = null;
  stage.addEventListener("pointerdown", (e) => {
    if (!state.captions.length) return;
    e.preventDefault();
    stage.setPointerCapture(e.pointerId);
    start = toImageCoords(e);
  });
  stage.addEventListener("pointermove", (e) => {
    if (!start) return;
    state.box = normaliseBox(start, toImageCoords(e));
    updateBox();
  });
  stage.addEventListener("pointerup", (e) => {
    if (!start) return;
    const box = normaliseBox(start, toImageCoords(e));
    start = null;
    // A click without a drag clears the box.
    setBox(box[2] - box[0] >= 1 && box[3] - box[1] >= 1 ? box : null);
  });
  $("box-apply").addEventListener("click", () => {
    if (!state.captions.length) return;
    const v = ["x0", "y0", "x1", "y1"].map((k) => parseFloat($(`box-${k}`).value));
    const { width, height } = state.captions[state.current].image;
    if (v.some((x) => !Number.isFinite(x)) || v[0] >= v[2] || v[1] >= v[3]) {
      $("error-box").textContent = "Enter four numbers with x0 < x1 and y0 < y1.";
    } else if (v[0] < 0 || v[1] < 0 || v[2] > width || v[3] > height) {
      $("error-box").textContent = `The box must lie inside the image (0–${width} × 0–${height} pixels).`;
    } else {
      setBox(v);
    }
  });
  $("box-clear").addEventListener("click", () => setBox(null));
}

// ---------- downloads ----------

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

function downloadJson() {
  const blob = new Blob([JSON.stringify(state.job, null, 1)], { type: "application/json" });
  download(blob, `exclip-${state.job.id}.json`);
}

function downloadPng() {
  const cap = state.captions[state.current];
  const overlay = $("overlay");
  const canvas = document.createElement("canvas");
  canvas.width = overlay.width;
  canvas.height = overlay.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage($("photo"), 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = parseFloat($("opacity").value);
  ctx.drawImage(overlay, 0, 0);
  ctx.globalAlpha = 1;
  if (state.box) {
    const s = canvas.width / cap.image.width;
    const [x0, y0, x1, y1] = state.box.map((v) => v * s);
    const line = Math.max(1, Math.round(Math.min(canvas.width, canvas.height) / 150));
    ctx.lineWidth = line;
    ctx.strokeStyle = "#000";
    ctx.strokeRect(x0 + line / 2, y0 + line / 2, x1 - x0 - line, y1 - y0 - line);
    ctx.strokeStyle = "#fff";
    ctx.strokeRect(x0 + 1.5 * line, y0 + 1.5 * line, x1 - x0 - 3 * line, y1 - y0 - 3 * line);
  }
  const sel = state.selection ? `-tokens-${state.selection.start}-${state.selection.end}` : "";
  canvas.toBlob((blob) => download(blob, `exclip-${state.job.id}-caption-${state.current}${sel}.png`), "image/png");
}

// ---------- start ----------

function setOpacity() {
  const v = parseFloat($("opacity").value);
  $("overlay").style.opacity = v;
  $("opacity-value").textContent = v.toFixed(2);
}

async function init() {
  setupDropzone();
  setupTokens();
  setupBox();
  $("explain-form").addEventListener("submit", explain);
  $("model").addEventListener("change", () => {
    applyStepRange();
    showDemoNote();
  });
  $("caption-select").addEventListener("change", (e) => showCaption(Number(e.target.value)));
  $("opacity").addEventListener("input", setOpacity);
  window.addEventListener("resize", fitStage);
  $("download-json").addEventListener("click", downloadJson);
  $("download-png").addEventListener("click", downloadPng);
  $("api-key").addEventListener("change", (e) => {
    state.apiKey = e.target.value.trim();
    sessionStorage.setItem("exclip-api-key", state.apiKey);
    $("error-key").textContent = "";
    $("field-key").classList.remove("invalid");
    loadModels();
  });
  if (state.apiKey) $("field-key").hidden = false;
  setOpacity();
  const response = await fetch("/static/colormap.json");
  state.stops = (await response.json()).stops;
  await Promise.all([loadModels(), loadExamples()]);
  document.body.dataset.ready = "true";
}

init();
