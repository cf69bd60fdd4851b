// about.html: the release's measured numbers, straight from the export's manifest.json and the
// browser index's meta.json (nothing typed in by hand).
import { wasmThreads } from "./threads.js";
import { askedDevice, gpuAdapter, rememberedDevice } from "./device.js";

const doc = document.getElementById("doc");
const el = (tag, text) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; };
const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString("en")
  : String(+v.toPrecision(4))) : typeof v === "object" ? JSON.stringify(v) : String(v));
const mb = (b) => `${(b / 1e6).toFixed(2)} MB`;

function table(headers, rows) {
  const t = el("table"), head = el("tr");
  headers.forEach((h) => head.append(el("th", h)));
  const thead = el("thead"), tbody = el("tbody");
  thead.append(head);
  for (const r of rows) { const tr = el("tr"); r.forEach((c) => tr.append(el("td", fmt(c)))); tbody.append(tr); }
  t.append(thead, tbody);
  return t;
}

function section(title, ...children) { doc.append(el("h2", title), ...children); }

try {
  const site = await (await fetch("site.json")).json();
  const m = await (await fetch(site.manifest)).json();
  doc.replaceChildren(el("h1", `Release ${m.model_version ?? ""}`.trim()),
    el("p", `Exported ${m.created ?? ""} (${m.format}); site built ${site.built}. Parameters: ${fmt(m.params)}.`));
  const mode = wasmThreads(window, location.search);
  const chat = new URL("index.html", location.href).href;  // the worker's folder: where its probe result is kept
  const choice = askedDevice(location.search) ? { device: askedDevice(location.search), how: "asked" }
    : await rememberedDevice(`supermix-files-${site.cache_key}`, chat);
  const adapter = choice ? null : await gpuAdapter(window);
  const wasm = mode.isolated
    ? `Cross-origin isolated: onnxruntime-web's wasm runs on ${mode.threads} thread${mode.threads === 1 ? "" : "s"}.`
    : "Not cross-origin isolated (no service worker, or it has not taken over this tab yet): onnxruntime-web's "
      + "wasm runs on 1 thread.";
  const probe = choice?.how === "probe" ? ` (measured on the first load: wasm ${fmt(choice.wasm_ms)} ms, WebGPU `
    + `${choice.webgpu_ms === null ? "failed" : `${fmt(choice.webgpu_ms)} ms`} for the same short run)` : "";
  section("This browser", el("p", choice?.device === "webgpu" ? `The chat runs on WebGPU${probe}.`
    : choice ? `The chat runs on wasm${probe}. ${wasm}`
    : adapter ? `This browser has WebGPU: the chat's first load times it against wasm and keeps the faster. ${wasm}`
    : `No WebGPU here: the chat runs on wasm. ${wasm}`));
  if (m.config) section("Configuration", table(["setting", "value"], Object.entries(m.config)));
  if (m.metrics && Object.keys(m.metrics).length) section("Evaluation", table(["metric", "value"], Object.entries(m.metrics)));
  if (m.gates?.length) {
    const keys = [...new Set(m.gates.flatMap((g) => Object.keys(g)))];
    section("Export gates", table(keys, m.gates.map((g) => keys.map((k) => g[k]))));
  }
  if (m.speed && Object.keys(m.speed).length) section("Speed (Python, this release)", table(["measure", "value"], Object.entries(m.speed)));
  if (m.generation) section("Generation defaults", table(["setting", "value"], Object.entries(m.generation)));
  const shipped = (m.files || []).filter((f) => !f.path.startsWith("index/"));
  const index = (m.files || []).filter((f) => f.path.startsWith("index/"));
  section("Files", table(["file", "size", "sha256"], [...shipped.map((f) => [f.path, mb(f.bytes), f.sha256.slice(0, 16) + "…"]),
    ...(index.length ? [[`index/ (${index.length} files)`, mb(index.reduce((a, f) => a + f.bytes, 0)), ""]] : [])]));
  if (site.index) {
    const meta = await (await fetch(site.index + "meta.json")).json();
    section("Retrieval index", el("p", `${fmt(meta.docs)} passages, ${fmt(meta.terms)} terms, BM25 (k1 ${meta.k1}, b ${meta.b}).`),
      table(["source", "passages"], Object.entries(meta.counts)));
  }
} catch (e) {
  doc.textContent = `Could not read the release manifest: ${e.message}`;
}
