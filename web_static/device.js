// Which onnxruntime-web device runs the model: "webgpu" when the visitor has a WebGPU adapter and it
// decodes faster than wasm in a short measured probe, else "wasm". The probe runs once per deployment
// (the Cache API entry is named after site.json's cache_key) and its result is remembered, so later visits
// load one model. `?device=wasm|webgpu` forces one (the benchmark, the tests). Shared by the chat worker
// and the About page, so the page says what actually runs.
//
// Why a probe and not "WebGPU whenever there is an adapter": this model is small (a forward pass is a few
// milliseconds of wasm), so a GPU's per-kernel launch and the logits read back each token can cost more
// than they save, and software adapters (SwiftShader) are far slower than wasm (docs/pages/decisions.md).

export const DEVICES = ["wasm", "webgpu"];
const PROBE_PROMPT = 8;  // tokens of prompt, and
const PROBE_NEW = 4;     // tokens decoded, per probe run (the same for both devices)
const GIVE_UP = 10;      // a WebGPU warm-up this many times slower than wasm's timed run is not timed further

export function askedDevice(search = "") {
  const asked = new URLSearchParams(search).get("device");
  return DEVICES.includes(asked) ? asked : null;
}

export async function gpuAdapter(scope = globalThis) {
  if (!scope.navigator?.gpu) return null;
  try { return await scope.navigator.gpu.requestAdapter(); } catch { return null; }
}

const choiceUrl = (base) => new URL("device.json", base).href;

/** The choice a probe made for this deployment, or null. */
export async function rememberedDevice(cacheName, base) {
  if (typeof caches === "undefined") return null;
  try {
    const hit = await (await caches.open(cacheName)).match(choiceUrl(base));
    const choice = hit && await hit.json();
    return DEVICES.includes(choice?.device) ? choice : null;
  } catch { return null; }
}

export async function rememberDevice(cacheName, base, choice) {
  if (typeof caches === "undefined") return;
  const body = JSON.stringify(choice);
  await (await caches.open(cacheName)).put(choiceUrl(base), new Response(body, { headers: { "content-type": "application/json" } }))
    .catch(() => {});  // not remembered: the next visit probes again
}

/** Milliseconds of one greedy run (PROBE_PROMPT prompt tokens, PROBE_NEW new ones) on `model`. */
async function timedRun(model, Tensor, tokenId) {
  const ids = new BigInt64Array(PROBE_PROMPT).fill(BigInt(tokenId));
  const t0 = performance.now();
  await model.generate({ input_ids: new Tensor("int64", ids, [1, PROBE_PROMPT]),
                         attention_mask: new Tensor("int64", new BigInt64Array(PROBE_PROMPT).fill(1n), [1, PROBE_PROMPT]),
                         max_new_tokens: PROBE_NEW, min_new_tokens: PROBE_NEW, do_sample: false });
  return performance.now() - t0;
}

/** Probe both devices: `wasmModel` is loaded; `loadGpu()` loads the WebGPU one. Returns the faster model and
 * the choice to remember ({device, how, wasm_ms, webgpu_ms, error}); the slower model is released. */
export async function probeDevices(wasmModel, loadGpu, Tensor, tokenId) {
  await timedRun(wasmModel, Tensor, tokenId);  // warm-up: first-run allocations
  const wasmMs = await timedRun(wasmModel, Tensor, tokenId);
  const choice = { device: "wasm", how: "probe", wasm_ms: +wasmMs.toFixed(1), webgpu_ms: null };
  let gpu = null;
  try {
    gpu = await loadGpu();
    const warm = await timedRun(gpu, Tensor, tokenId);  // compiles the shaders
    const gpuMs = warm > GIVE_UP * wasmMs ? warm : await timedRun(gpu, Tensor, tokenId);
    choice.webgpu_ms = +gpuMs.toFixed(1);
    if (gpuMs < wasmMs) choice.device = "webgpu";
  } catch (e) {
    choice.error = String(e?.message || e);
  }
  const [keep, drop] = choice.device === "webgpu" ? [gpu, wasmModel] : [wasmModel, gpu];
  try { await drop?.dispose(); } catch { /* its memory goes with the worker anyway */ }
  return { model: keep, choice };
}
