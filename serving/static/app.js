// The page: lists the served models (GET /v1/models) and shows, for an image the user drops or
// chooses, the PCA feature map, the CLS attention (models with output `cls_attention`) and the
// embedding of one or two models side by side (POST /v1/features and /v1/embeddings).
"use strict";

const ATTENTION = "cls_attention";
const VIEW_PX = 224;
const $ = (id) => document.getElementById(id);
let models = [];
let lastImage = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const json = await response.json();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${json.error ? json.error.message : ""}`);
  return json;
}

function status(text) { $("status").textContent = text || ""; }

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function kv(obj, digits = 4) {
  const entries = Object.entries(obj || {});
  return entries.length ? entries.map(([k, v]) => `${k}=${typeof v === "number" ? v.toPrecision(digits) : v}`).join(", ") : "—";
}

function renderModels() {
  const body = $("models").tBodies[0];
  body.innerHTML = "";
  for (const m of models) {
    const row = body.insertRow();
    row.dataset.model = m.id;
    const parity = (m.manifest && m.manifest.parity) || {};
    cell(row, m.id);
    cell(row, (m.versions || [m.model.version]).join(", "));
    cell(row, m.precision + (m.base_model ? ` (of ${m.base_model})` : ""));
    cell(row, `${m.input_height}×${m.input_width}×${m.input_channels}`);
    cell(row, `${m.grid_height}×${m.grid_width} / ${m.patch_size}`);
    cell(row, String(m.embed_dim));
    cell(row, kv(m.lanes));
    cell(row, (m.buckets || []).map((b) => `${b.height}×${b.width}`).join(", ") || "—");
    cell(row, (m.outputs || []).join(", "));
    cell(row, kv(m.probe_scores));
    cell(row, parity.max_abs_err ? `${kv(parity.max_abs_err, 2)} (tol ${parity.tolerance})` : "—");
  }
  for (const id of ["model-a", "model-b"]) {
    const select = $(id);
    const keep = select.value;
    [...select.options].filter((o) => o.value).forEach((o) => o.remove());
    for (const m of models) select.add(new Option(m.id, m.id));
    if (keep && models.some((m) => m.id === keep)) select.value = keep;
  }
  $("model-a").dataset.loaded = "1";
}

async function loadModels() {
  try {
    models = (await api("/v1/models")).data;
    renderModels();
    status(models.length ? "" : "no models are served");
  } catch (e) {
    status(`cannot list the models: ${e.message}`);
  }
}

function figure(parent, caption, size, cls) {
  const fig = document.createElement("figure");
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  if (cls) canvas.className = cls;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(canvas, cap);
  parent.append(fig);
  return canvas;
}

function drawEmbedding(div, vector) {
  const norm = Math.sqrt(vector.reduce((s, x) => s + x * x, 0));
  const first = Array.from(vector.slice(0, 8), (x) => Number(x.toFixed(4)));
  div.dataset.norm = String(norm);
  div.dataset.first = JSON.stringify(first);
  div.dataset.dim = String(vector.length);
  const text = document.createElement("div");
  text.className = "embedding-text";
  text.textContent = `embedding (CLS): dim ${vector.length}, ‖e‖ = ${norm.toFixed(4)}, first: [${first.map((x) => x.toFixed(4)).join(", ")}, …]`;
  const strip = document.createElement("canvas");
  const n = Math.min(vector.length, 96);
  strip.width = 4 * n; strip.height = 40; strip.className = "strip";
  const ctx = strip.getContext("2d");
  const scale = Math.max(...Array.from(vector.slice(0, n), Math.abs)) || 1;
  for (let i = 0; i < n; i++) {
    const hgt = (vector[i] / scale) * 19;
    ctx.fillStyle = vector[i] >= 0 ? "#3b6fd8" : "#d8573b";
    ctx.fillRect(4 * i, 20 - Math.max(hgt, 0), 3, Math.abs(hgt));
  }
  div.append(text, strip);
}

async function showModel(name, dataUrl, panels) {
  const model = models.find((m) => m.id === name);
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.dataset.model = name;
  panel.innerHTML = `<h3>${name} <span class="muted">v${model.model.version}, ${model.precision}</span></h3>`;
  const maps = document.createElement("div");
  maps.className = "maps";
  panel.append(maps);
  panels.append(panel);
  const hasAttention = (model.outputs || []).includes(ATTENTION);
  const outputs = hasAttention ? ["patch_tokens", ATTENTION] : ["patch_tokens"];
  const [features, embedding] = await Promise.all([
    api("/v1/features", { model: name, input: [dataUrl], layout: "tokens", dtype: "float32", outputs }),
    api("/v1/embeddings", { model: name, input: [dataUrl], encoding_format: "float" }),
  ]);
  const h = features.grid_height, w = features.grid_width;
  const tokens = features.layers.find((l) => l.name === "patch_tokens").features;
  const d = tokens.shape[tokens.shape.length - 1];
  const X = Views.decodeTensor(tokens);
  Views.drawGrid(figure(maps, `PCA of patch tokens (${h}×${w}, ${d}-d)`, VIEW_PX, "pca"), Views.pcaColours(X, h * w, d), h, w);
  // FeaturesResponse.cls_attention [1, heads, h*w] when the request named it among its outputs
  const attention = features.cls_attention;
  if (attention && attention.data) {
    const A = Views.decodeTensor(attention);
    const heads = attention.shape[1];
    const mean = new Float32Array(h * w);
    for (let k = 0; k < heads; k++) for (let i = 0; i < h * w; i++) mean[i] += A[k * h * w + i] / heads;
    const att = document.createElement("div");
    att.className = "attention";
    Views.drawGrid(figure(maps, `CLS attention, mean of ${heads} heads`, VIEW_PX, "attn-mean"), Views.heatColours(mean), h, w);
    const row = document.createElement("div");
    row.className = "heads";
    for (let k = 0; k < heads; k++) {
      Views.drawGrid(figure(row, `head ${k}`, 72, "attn-head"), Views.heatColours(A.subarray(k * h * w, (k + 1) * h * w)), h, w);
    }
    att.append(row);
    panel.append(att);
  }
  const emb = document.createElement("div");
  emb.className = "embedding";
  drawEmbedding(emb, Float32Array.from(embedding.data[0].embedding));
  panel.append(emb);
  panel.dataset.done = "1";
}

function drawInput(dataUrl) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = $("input");
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      $("input-figure").hidden = false;
      resolve();
    };
    img.onerror = () => reject(new Error("the browser cannot read this file as an image"));
    img.src = dataUrl;
  });
}

async function show(dataUrl) {
  lastImage = dataUrl;
  const panels = $("panels");
  panels.innerHTML = "";
  panels.dataset.done = "";
  const names = [$("model-a").value, $("model-b").value].filter((v, i, a) => v && a.indexOf(v) === i);
  if (!names.length) { status("no model chosen"); return; }
  try {
    await drawInput(dataUrl);
    status("computing…");
    await Promise.all(names.map((n) => showModel(n, dataUrl, panels)));
    panels.dataset.done = "1";
    status("");
  } catch (e) {
    status(e.message);
  }
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => show(reader.result);
  reader.onerror = () => status(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

function setUp() {
  $("token").value = localStorage.getItem("vitserve-token") || "";
  $("token").addEventListener("change", () => { localStorage.setItem("vitserve-token", $("token").value); loadModels(); });
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  for (const id of ["model-a", "model-b"]) $(id).addEventListener("change", () => { if (lastImage) show(lastImage); });
  loadModels();
}

setUp();
