// The chat page: UI only. The model, retrieval and the prompt run in worker.js, so typing and
// scrolling never wait for a token. `window.supermix` exposes the state for tests and benchmarks.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const dtype = ["q8", "fp32"].includes(params.get("dtype")) ? params.get("dtype") : null;  // null: site.json's
await isolate();
const worker = new Worker("worker.js", { type: "module" });
const history = [];  // {role, content}: what the next request sends
const files = new Map();  // download progress per file
let busy = false, current = null, nextId = 1;
const app = window.supermix = { ready: false, replies: [], errors: [], renderReply, startConversation, loadMs: null };

if (dtype) $("dtype").value = dtype;
$("dtype").addEventListener("change", () => {  // a different file: reload with the new query parameter
  params.set("dtype", $("dtype").value);
  location.search = params.toString();
});
for (const [id, out] of [["temperature", "temperature-out"], ["top-p", "top-p-out"]]) {
  $(id).addEventListener("input", () => { $(out).value = $(id).value; });
}
for (const [key, id] of [["temperature", "temperature"], ["top_p", "top-p"], ["max_new_tokens", "max-tokens"]]) {
  if (params.has(key)) $(id).value = params.get(key);  // ?temperature=0 etc. (tests, benchmarks, links)
}
$("temperature-out").value = $("temperature").value;
$("top-p-out").value = $("top-p").value;

function setStatus(text) { $("status").textContent = text; }
function setBusy(on) {
  busy = on;
  $("send").disabled = on || !app.ready;
  $("stop").disabled = !on;
  $("prompt").disabled = !app.ready;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addMessage(role, text) {
  const box = el("article", `msg ${role}`);
  box.setAttribute("aria-label", role === "user" ? "You" : "Supermix");
  box.append(el("div", "body", text));
  $("log").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

/** One source as an expandable item: "[n] title · source", the passage inside. */
function sourceItem(s) {
  const li = el("li");
  li.dataset.id = s.id;
  const det = el("details");
  const sum = el("summary");
  sum.append(`[${s.number}] ${s.title || s.id} `, el("span", "muted", `· ${s.source}`));
  det.append(sum, el("blockquote", "passage", s.text));
  li.append(det);
  return li;
}

function showReply(box, reply) {
  box.querySelector(".body").textContent = reply.text;
  box.removeAttribute("aria-busy");
  if (reply.citations.length) {  // what the answer cites, as runtime_python.chat.Reply.citations
    const list = el("ol", "citations");
    list.setAttribute("aria-label", "Citations");
    reply.citations.forEach((c) => list.append(sourceItem(c)));
    box.append(list);
  }
  if (reply.sources.length) {  // everything the model was shown, folded away
    const det = el("details", "sources");
    det.append(el("summary", "muted", `Sources shown to the model (${reply.sources.length})`));
    const list = el("ol", "citations");
    reply.sources.forEach((s) => list.append(sourceItem(s)));
    det.append(list);
    box.append(det);
  }
  box.append(el("p", "muted meta", `${reply.completion_tokens} tokens · ${reply.tokens_per_second.toFixed(1)} tok/s` +
                                   (reply.finish_reason === "length" ? " · stopped at the token limit" : "")));
}

/** Render a reply object as an assistant message (also used by tests to check citation markup). */
function renderReply(reply) {
  const box = addMessage("assistant", "");
  showReply(box, reply);
  return box;
}

/** For tests and evaluation (`builder eval --via site`), not the UI: start a new chat whose earlier
 * turns are `turns` ([{role: "user" | "assistant", content}], alternating, from a user turn), shown as
 * if they had been typed and answered; the next message sent continues that conversation. */
function startConversation(turns = []) {
  if (busy) throw new Error("a reply is being generated");
  turns.forEach((t, i) => {
    if (t?.role !== (i % 2 ? "assistant" : "user") || typeof t.content !== "string") {
      throw new Error(`turns[${i}] must be {role: "${i % 2 ? "assistant" : "user"}", content: string}`);
    }
  });
  history.length = 0;
  $("log").replaceChildren();
  for (const t of turns) {
    addMessage(t.role, t.content);
    history.push({ role: t.role, content: t.content });
  }
  return history.length;
}

worker.onmessage = ({ data }) => {
  if (data.type === "progress") {
    files.set(data.file, data);
    let loaded = 0, total = 0;
    for (const f of files.values()) { loaded += f.loaded || 0; total += f.total || 0; }
    if (total) {
      $("progress").value = loaded / total;
      $("progress-label").textContent = `Downloading the model: ${(loaded / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`;
    }
  } else if (data.type === "ready") {
    app.ready = true;
    app.loadMs = data.load_ms;
    app.loadSteps = data.steps;  // ms from the start of loading to the end of each step
    app.site = data.site;
    $("loader").hidden = true;
    if (!data.retrieval) { $("retrieval").checked = false; $("retrieval").disabled = true; }
    app.threads = data.threads;
    app.dtype = $("dtype").value = data.dtype;
    app.isolated = data.isolated;
    app.device = data.device;
    app.deviceChoice = data.device_choice;
    const runs = data.device === "webgpu" ? "WebGPU" : data.threads === 1 ? "1 thread" : `${data.threads} threads`;
    setStatus(`Ready: ${data.site.model_version || "model"} (${data.dtype}, ${runs}), loaded in ${(data.load_ms / 1000).toFixed(1)} s.`);
    setBusy(false);
    $("prompt").focus();
  } else if (data.type === "sources" && current?.id === data.id) {
    current.sources = data.sources;
  } else if (data.type === "delta" && current?.id === data.id) {
    current.box.querySelector(".body").textContent += data.text;
    current.box.scrollIntoView({ block: "end" });
  } else if (data.type === "done" && current?.discarded) {  // a reply stopped by "New chat"
    current = null;
    setBusy(false);
  } else if (data.type === "done" && current?.id === data.id) {
    showReply(current.box, data.reply);
    history.push({ role: "assistant", content: data.reply.text });
    app.replies.push(data.reply);
    setStatus(`${data.reply.completion_tokens} tokens in ${data.reply.seconds.toFixed(1)} s.`);
    current = null;
    setBusy(false);
    $("prompt").focus();
  } else if (data.type === "error" || data.type === "warning") {
    app.errors.push(data.message);
    if (data.type === "error" && current) {
      current.box.removeAttribute("aria-busy");
      current.box.append(el("p", "error", data.message));
      history.pop();  // the turn failed: do not send it again
      current = null;
    }
    if (!app.ready && data.type === "error") $("progress-label").textContent = `Could not load the model: ${data.message}`;
    setStatus(data.message);
    setBusy(false);
  }
};
worker.onerror = (e) => { app.errors.push(e.message); setStatus(`Worker failed: ${e.message}`); };
worker.postMessage({ type: "load", dtype, search: location.search });

/** Register sw.js (offline shell, and the COOP/COEP headers that let onnxruntime-web run threads). A
 * page it does not control yet is not isolated: reload once when it takes over, at most once per tab,
 * and run single-threaded wherever that does not make the page isolated. */
async function isolate() {
  if (!("serviceWorker" in navigator) || params.has("nosw")) return;
  const registration = await navigator.serviceWorker.register("sw.js").catch(() => null);
  if (!registration || window.crossOriginIsolated || sessionStorage.getItem("supermix-isolation-reload")) return;
  if (!navigator.serviceWorker.controller) {
    const controlled = new Promise((resolve) => navigator.serviceWorker.addEventListener("controllerchange", resolve, { once: true }));
    await Promise.race([controlled, new Promise((resolve) => setTimeout(resolve, 3000))]);
    if (!navigator.serviceWorker.controller) return;
  }
  sessionStorage.setItem("supermix-isolation-reload", "1");
  location.reload();
  await new Promise(() => {});  // the reload replaces this page
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (busy || !app.ready || !text.trim()) return;
  $("prompt").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
  const box = addMessage("assistant", "");
  box.setAttribute("aria-busy", "true");
  current = { id: nextId++, box };
  const num = (id, fallback) => { const v = Number($(id).value); return Number.isFinite(v) ? v : fallback; };
  const settings = { temperature: num("temperature", 0.7), top_p: num("top-p", 0.9),
                     max_new_tokens: Math.max(1, Math.round(num("max-tokens", 256))), retrieval: $("retrieval").checked };
  if (params.has("seed")) settings.seed = Number(params.get("seed"));
  if (params.has("min_new_tokens")) settings.min_new_tokens = Number(params.get("min_new_tokens"));  // benchmarks
  worker.postMessage({ type: "generate", id: current.id, messages: [...history], settings });
  setBusy(true);
  setStatus("Thinking…");
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => worker.postMessage({ type: "stop" }));
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && busy) worker.postMessage({ type: "stop" }); });
$("new-chat").addEventListener("click", () => {
  if (busy) {  // stay busy until the worker confirms: one reply at a time
    worker.postMessage({ type: "stop" });
    current.discarded = true;
  }
  history.length = 0;
  $("log").replaceChildren();
  setStatus("New chat.");
  $("prompt").focus();
});
