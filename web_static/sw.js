// Offline start for the page shell (HTML, JS, CSS, site.json, the transformers.js bundle, the ORT .mjs):
// network first, so a redeploy is seen at once, and the cached copy when the network is gone. The
// model, the wasm and the index are cached by worker.js / transformers.js in their own caches (keyed
// by the site's content hash), so they pass through here untouched.
const SHELL = "supermix-shell";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (e) => {
  const url = new URL(e.request.url);
  if (e.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname.includes("/models/") || url.pathname.endsWith(".wasm")) return;
  e.respondWith((async () => {
    const cache = await caches.open(SHELL);
    try {
      const res = await fetch(e.request);
      if (res.ok) await cache.put(e.request, res.clone());
      return res;
    } catch (err) {
      const hit = await cache.match(e.request, { ignoreSearch: true });
      if (hit) return hit;
      throw err;
    }
  })());
});
