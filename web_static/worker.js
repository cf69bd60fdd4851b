// The model lives here, off the page's thread: transformers.js (wasm, threaded when isolated), retrieval,
// the prompt, sampling and streaming. Messages in: load, generate, stop. Out: progress, ready,
// sources, delta, done, error. Every URL is relative to this file, so the site works under /REPO/.
import { env, AutoTokenizer, AutoModelForCausalLM, InterruptableStoppingCriteria, Tensor } from "./vendor/transformers.js";
import { Index } from "./retrieval.js";
import { buildPrompt, chatTokenizer, citedNumbers, prepareContext, retrievalQuery } from "./prompt.js";
import { wasmThreads } from "./threads.js";
import { askedDevice, gpuAdapter, probeDevices, rememberDevice, rememberedDevice } from "./device.js";

const here = (path) => new URL(path, self.location.href).href;
let CACHE = null;  // "supermix-files-<cache_key>": the wasm and index shards; the model files go to
                  // transformers.js's cache, named "supermix-model-<cache_key>" below

env.allowRemoteModels = false;  // never the Hub
env.allowLocalModels = true;
env.localModelPath = "models/";  // resolved against this worker's URL
env.useBrowserCache = true;      // model files go to the Cache API: the second visit works offline
env.backends.onnx.wasm.wasmPaths = here("vendor/ort/");  // the .mjs glue; the .wasm bytes we pass ourselves

let site, tokenizer, model, index, endIds, maxSeqLen, mode, device;
const forwardMs = [];  // per forward pass of the last reply: the benchmark splits model time from overhead
const stopping = new InterruptableStoppingCriteria();

/** Cache-first fetch of our own files, reporting download progress for the big ones. */
async function cachedBytes(url, onProgress) {
  const cache = CACHE && typeof caches !== "undefined" ? await caches.open(CACHE).catch(() => null) : null;
  const hit = cache && await cache.match(url);
  if (hit) return hit.arrayBuffer();
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  const total = Number(res.headers.get("content-length")) || 0;
  const parts = [];
  let loaded = 0;
  for (const reader = res.body.getReader(); ;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    loaded += value.length;
    onProgress?.(loaded, total);
  }
  const buf = await new Blob(parts).arrayBuffer();
  await cache?.put(url, new Response(buf.slice(0), { headers: { "content-type": res.headers.get("content-type") || "" } }))
    .catch(() => {});  // a full disk only costs the offline start
  return buf;
}

const post = (msg) => self.postMessage(msg);

/** site.json: network first (a redeploy must be seen), the cached copy when offline. */
async function siteConfig() {
  const url = here("site.json");
  const cache = typeof caches !== "undefined" ? await caches.open("supermix-site").catch(() => null) : null;
  try {
    const res = await fetch(url, { cache: "no-cache" });
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    await cache?.put(url, res.clone()).catch(() => {});
    return await res.json();
  } catch (e) {
    const hit = cache && await cache.match(url);
    if (!hit) throw e;
    return hit.json();
  }
}

async function load(dtype, search = "") {
  mode = wasmThreads(self, search);  // threads only on a cross-origin isolated page (sw.js)
  env.backends.onnx.wasm.numThreads = mode.threads;
  const t0 = performance.now();
  site = await siteConfig();
  dtype = dtype || site.dtype;  // the page's ?dtype=, else the weights the site ships by default
  CACHE = `supermix-files-${site.cache_key}`;
  env.cacheKey = `supermix-model-${site.cache_key}`;
  if (typeof caches !== "undefined") {  // drop the caches of earlier deployments
    for (const name of await caches.keys()) {
      if (/^supermix-(files|model)-/.test(name) && !name.endsWith(site.cache_key)) await caches.delete(name);
    }
  }
  const progress = (file) => (loaded, total) => post({ type: "progress", file, loaded, total });
  const onFile = (e) => { if (e.status === "progress") post({ type: "progress", file: e.file, loaded: e.loaded, total: e.total }); };
  const steps = {};
  const timed = (name, promise) => promise.finally(() => { steps[name] = Math.round(performance.now() - t0); });
  // tokenizer and index do not need the wasm: they load while it downloads and compiles
  const tokenizerReady = timed("tokenizer", AutoTokenizer.from_pretrained(site.model_id, { progress_callback: onFile }));
  const indexReady = timed("index", site.index ? new Index(here(site.index), (u) => cachedBytes(u)).load().catch((e) => {
    post({ type: "warning", message: `retrieval off: ${e.message}` });
    return null;
  }) : Promise.resolve(null));
  // the wasm is the biggest download (27 MB): fetch it ourselves so the bar shows it and it is cached
  env.backends.onnx.wasm.wasmBinary = new Uint8Array(await timed("wasm",
    cachedBytes(here("vendor/ort/ort-wasm-simd-threaded.asyncify.wasm"), progress("ort-wasm"))));
  // the device: ?device=, else what this deployment's probe chose, else wasm; with a WebGPU adapter and
  // no choice yet, the probe (device.js) times both once and keeps the faster
  const asked = askedDevice(search);
  const remembered = asked ? null : await rememberedDevice(CACHE, self.location.href);
  const adapter = asked || remembered ? null : await gpuAdapter(self);
  device = asked ? { device: asked, how: "asked" } : remembered ? { ...remembered, how: "remembered" }
    : adapter ? null : { device: "wasm", how: "no WebGPU adapter" };
  const loadModel = (dev) => AutoModelForCausalLM.from_pretrained(site.model_id, { dtype, device: dev, progress_callback: onFile });
  model = await timed("model", loadModel(device?.device || "wasm"));
  [tokenizer, index] = await Promise.all([tokenizerReady, indexReady]);
  if (!device) {
    const probed = await timed("probe", probeDevices(model, () => loadModel("webgpu"), Tensor, model.config.bos_token_id ?? 0));
    model = probed.model;
    device = probed.choice;
    await rememberDevice(CACHE, self.location.href, device);
  }
  // transformers.js awaits only microtasks between tokens; yield a macrotask per forward pass so a
  // "stop" message is handled mid-reply (MessageChannel: no 4 ms setTimeout clamp)
  const forward = model.forward.bind(model);
  model.forward = async (inputs) => {
    await nextTask();
    const t = performance.now();
    try { return await forward(inputs); } finally { forwardMs.push(performance.now() - t); }
  };
  maxSeqLen = model.config.max_position_embeddings;
  // as in runtime_python.chat: </s>, <s> and every chat-role token end a reply
  endIds = new Set(site.end_tokens.map((t) => tokenizer.encode(t, { add_special_tokens: false })[0]));
  post({ type: "ready", dtype, load_ms: Math.round(performance.now() - t0), steps, site, retrieval: !!index, ...mode,
         device: device.device, device_choice: device });
}

function nextTask() {
  return new Promise((resolve) => { const ch = new MessageChannel(); ch.port1.onmessage = resolve; ch.port2.postMessage(0); });
}

// A seeded PRNG when a seed is given (the same seed gives the same reply here; torch's differs)
function rng(seed) {
  if (seed === null || seed === undefined) return Math.random;
  let a = seed >>> 0;
  return () => { a = (a + 0x6d2b79f5) >>> 0; let t = a; t = Math.imul(t ^ (t >>> 15), t | 1);
                 t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}

/** runtime_python.generation.sample_next's order: temperature -> top-k -> top-p -> one draw. As a
 * logits processor that leaves only the drawn token finite, so transformers.js's argmax takes it. */
function sampler(cfg, random) {
  return (_ids, logits) => {
    if (cfg.temperature === 0) return logits;  // greedy: argmax, as in Python
    const data = logits.data, n = data.length;
    let idx = Array.from({ length: n }, (_, i) => i);
    if (cfg.top_k > 0 && cfg.top_k < n || cfg.top_p < 1) {
      idx.sort((a, b) => data[b] - data[a]);
      if (cfg.top_k > 0 && cfg.top_k < n) idx = idx.slice(0, cfg.top_k);
    }
    const scaled = idx.map((i) => data[i] / cfg.temperature), top = Math.max(...scaled);
    let probs = scaled.map((x) => Math.exp(x - top));
    const sum = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / sum);
    if (cfg.top_p < 1) {  // the smallest prefix whose mass reaches top_p
      let before = 0, keep = 0;
      while (keep < probs.length && before < cfg.top_p) before += probs[keep++];
      idx = idx.slice(0, Math.max(1, keep));
      probs = probs.slice(0, idx.length);
    }
    let r = random() * probs.reduce((a, b) => a + b, 0), pick = idx[idx.length - 1];
    for (let i = 0; i < idx.length; i++) { r -= probs[i]; if (r < 0) { pick = idx[i]; break; } }
    data.fill(-Infinity);
    data[pick] = 0;
    return logits;
  };
}

async function generate({ id, messages, settings }) {
  const t0 = performance.now();
  const cfg = { temperature: 0.7, top_p: 0.9, top_k: 0, max_new_tokens: 256, retrieval: true, k: 3, seed: null,
                ...settings };
  const question = retrievalQuery(messages, site.system_prompt);  // source.prompt.retrieval_query
  const found = index && cfg.retrieval && cfg.k > 0 ? await index.search(question, cfg.k) : [];
  const passages = prepareContext(found, site.passage_chars);
  const { ids, passages: shown } = buildPrompt(chatTokenizer(tokenizer, site.chat), messages, passages, site.system_prompt,
                                               cfg.max_new_tokens, maxSeqLen, site.min_passage_chars);
  const sources = shown.map((p, i) => ({ number: i + 1, id: p.id, title: p.title, source: p.source, text: p.text }));
  post({ type: "sources", id, sources });
  stopping.reset();
  forwardMs.length = 0;
  const out = [];
  let shownText = "", tFirst = 0, lastId = null, skipPrompt = true;
  const streamer = {  // transformers.js calls put() with the prompt first, then each new token
    put(value) {
      if (skipPrompt) { skipPrompt = false; return; }
      const tokenId = Number(value[0][0]);
      lastId = tokenId;
      if (endIds.has(tokenId)) return;  // the end token is not reply text
      if (!out.length) tFirst = performance.now();
      out.push(tokenId);
      const text = tokenizer.decode(out, { skip_special_tokens: true });
      // hold back a half-decoded UTF-8 character; the final text replaces the streamed one anyway
      if (!text.endsWith("\ufffd") && text.startsWith(shownText) && text.length > shownText.length) {
        post({ type: "delta", id, text: text.slice(shownText.length) });
        shownText = text;
      }
    },
    end() {},
  };
  const inputIds = new BigInt64Array(ids.map(BigInt));
  await model.generate({
    input_ids: new Tensor("int64", inputIds, [1, ids.length]),
    attention_mask: new Tensor("int64", new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
    max_new_tokens: cfg.max_new_tokens, do_sample: false, num_beams: 1, top_k: 0, repetition_penalty: 1.0,
    no_repeat_ngram_size: 0, min_length: 0, min_new_tokens: cfg.min_new_tokens ?? null, eos_token_id: [...endIds],
    logits_processor: [sampler(cfg, rng(cfg.seed))], stopping_criteria: [stopping], streamer,
  });
  const seconds = (performance.now() - t0) / 1000;
  // transformers.js refuses to decode [] (a reply that ended or was stopped before its first token)
  const text = out.length ? tokenizer.decode(out, { skip_special_tokens: true }) : "";
  const cited = new Set(citedNumbers(text));
  const finish = lastId !== null && endIds.has(lastId) || stopping.interrupted ? "stop" : "length";
  post({ type: "done", id, reply: {
    text, token_ids: out, prompt_ids: ids, prompt_tokens: ids.length, completion_tokens: out.length,
    finish_reason: finish, seconds, tokens_per_second: out.length / seconds,
    decode_tokens_per_second: out.length > 1 ? (out.length - 1) / ((performance.now() - tFirst) / 1000) : null,
    sources, citations: sources.filter((s) => cited.has(s.number)), forward_ms: forwardMs.map((x) => +x.toFixed(2)),
  } });
}

self.onmessage = async ({ data }) => {
  if (data.type === "stop") { stopping.interrupt(); return; }
  try {
    if (data.type === "load") await load(data.dtype, data.search);
    else if (data.type === "generate") await generate(data);
  } catch (e) {
    post({ type: "error", id: data.id, message: String(e?.message || e) });
  }
};
