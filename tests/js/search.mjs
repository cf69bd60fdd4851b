// node tests/js/search.mjs INDEX_DIR K < queries.json  ->  [[{id, score}, ...], ...] as JSON on stdout.
// Runs web_static/retrieval.js over files on disk, for the Python-vs-JS parity test.
import { readFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
import { BrowserIndex } from "../../web_static/retrieval.js";

const [dir, k] = process.argv.slice(2);
const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const queries = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const fetchBytes = async (url) => { const b = await readFile(new URL(url)); return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength); };
const index = await new BrowserIndex(pathToFileURL(dir).href.replace(/\/?$/, "/"), fetchBytes).load();
const out = [];
for (const q of queries) out.push((await index.search(q, Number(k))).map((p) => ({ id: p.id, score: p.score })));
process.stdout.write(JSON.stringify(out));
