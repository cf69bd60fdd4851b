// Offline start for the page shell (HTML, JS, CSS, site.json, the transformers.js bundle, the ORT .mjs):
// network first, so a redeploy is seen at once, and the cached copy when the network is gone. The
// model, the wasm and the index are cached by worker.js / transformers.js in their own caches (keyed
// by the site's content hash), so they pass through here untouched.
// It also makes the page cross-origin isolated, so onnxruntime-web can run threads: GitHub Pages sends no
// COOP/COEP headers, so documents and worker scripts get them here (every file is same-origin, so
// require-corp blocks nothing of ours). A page loaded before this worker controlled it reloads once
// (app.js).
const SHELL = "supermix-shell";
const ISOLATION = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp" };

function isolated(res) {
  if (!res || res.type === "opaque" || res.status === 0) return res;
  const headers = new Headers(res.headers);
  for (const [k, v] of Object.entries(ISOLATION)) headers.set(k, v);
  return new Response(res.body, { status: res.status, statusText: res.statusText, headers });
}

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (e) => {
  const url = new URL(e.request.url);
  if (e.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname.includes("/models/") || url.pathname.endsWith(".wasm")) return;
  const headed = ["document", "worker", "sharedworker", "iframe"].includes(e.request.destination) ? isolated : (r) => r;
  e.respondWith((async () => {
    const cache = await caches.open(SHELL);
    try {
      const res = await fetch(e.request);
      if (res.ok) await cache.put(e.request, res.clone());
      return headed(res);
    } catch (err) {
      const hit = await cache.match(e.request, { ignoreSearch: true });
      if (hit) return headed(hit);
      throw err;
    }
  })());
});
