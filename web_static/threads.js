// How many onnxruntime-web threads this page can run: threads need SharedArrayBuffer, which browsers
// give only to cross-origin isolated pages (sw.js adds the headers GitHub Pages does not send). Shared
// by the chat worker and the About page, so the page says what actually runs. `?threads=N` overrides
// (1 forces the single-threaded path on an isolated page, for the benchmark and the tests).
export function wasmThreads(scope = globalThis, search = "") {
  const isolated = !!scope.crossOriginIsolated;
  const asked = Number(new URLSearchParams(search).get("threads"));
  const cores = Math.max(1, Math.min(4, scope.navigator?.hardwareConcurrency || 1));
  const threads = !isolated ? 1 : Number.isInteger(asked) && asked >= 1 ? Math.min(asked, cores) : cores;
  return { isolated, threads };
}
