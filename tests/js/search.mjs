// node tests/js/search.mjs INDEX_DIR K < queries.json  ->  [{ranked: [[doc, score], ...], ids: [...]}, ...] on stdout.
// Runs web_static/retrieval.js over files on disk, for the Python-vs-JS parity test (scores unrounded).
import { readFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
import { Index } from "../../web_static/retrieval.js";

const [dir, k] = process.argv.slice(2);
const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const queries = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const fetchBytes = async (url) => { const b = await readFile(new URL(url)); return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength); };
const index = await new Index(pathToFileURL(dir).href.replace(/\/?$/, "/"), fetchBytes).load();
const out = [];
for (const q of queries) {
  out.push({ ranked: await index.ranked(q, Number(k)), ids: (await index.search(q, Number(k))).map((p) => p.id) });
}
process.stdout.write(JSON.stringify(out));
