// BM25 search over the static index written by builder/browser_index.py (read that file's docstring).
// Every function here mirrors one there, step for step, so the same query gives the same passages
// in Python and in the browser (tests/test_site.py checks it). Works in a page, a worker and node.

const WORD = /[\p{L}\p{N}]+/gu;           // Python's [^\W_]+
const IDENT = /[\p{L}\p{N}_]+(?:\.[\p{L}\p{N}_]+)+|[\p{L}\p{N}_]*_[\p{L}\p{N}_]*/gu;  // json.dumps, skip_keys
const MARKS = /\p{M}/gu;

/** Lower-case words with diacritics removed (builder.browser_index.words). */
export function words(text) {
  return text.toLowerCase().normalize("NFD").replace(MARKS, "").match(WORD) || [];
}

/** Harman's S-stemmer (builder.browser_index.stem). */
export function stem(w) {
  if (w.length > 3 && w.endsWith("ies") && !w.endsWith("eies") && !w.endsWith("aies")) return w.slice(0, -3) + "y";
  if (w.length > 3 && w.endsWith("es") && !["aes", "ees", "oes"].some((s) => w.endsWith(s))) return w.slice(0, -1);
  if (w.length > 2 && w.endsWith("s") && !w.endsWith("us") && !w.endsWith("ss")) return w.slice(0, -1);
  return w;
}

const unique = (xs) => [...new Set(xs)];

/** Distinct stemmed query words minus stop words (builder.browser_index.query_terms). */
export function queryTerms(query, stopWords, limit) {
  const ws = words(query);
  const kept = ws.filter((w) => !stopWords.has(w));
  return unique(unique(kept.length ? kept : ws).map(stem)).slice(0, limit);
}

/** source.retrieval.title_key: "json.dumps()" -> "json dumps", with the import aliases. */
export function titleKey(title, aliases) {
  let key = (title.toLowerCase().match(WORD) || []).join(" ");
  for (const [prefix, alias] of aliases) {
    if (key.startsWith(prefix)) return alias + key.slice(prefix.length);
  }
  return key;
}

/** source.retrieval.other_number: "expressions" -> "expression", "slicing" -> "slicings", "class" -> "classes". */
export function otherNumber(w) {
  if (w.endsWith("ies") && w.length > 4) return w.slice(0, -3) + "y";
  if (["sses", "xes", "ches", "shes"].some((s) => w.endsWith(s))) return w.slice(0, -2);
  if (w.endsWith("s") && !["ss", "us", "is"].some((s) => w.endsWith(s))) return w.slice(0, -1);
  if (w.endsWith("y") && w.length > 2 && !"aeiou".includes(w[w.length - 2])) return w.slice(0, -1) + "ies";
  return w + (["s", "x", "ch", "sh"].some((s) => w.endsWith(s)) ? "es" : "s");
}

/** source.retrieval.title_candidates: the query's identifiers; all its non-stop words together, and again
 * without the context words; each with its last word in the other number unless an identifier holds it. */
export function titleCandidates(query, stopWords, limit, aliases, contextWords = new Set()) {
  const ws = (query.toLowerCase().match(WORD) || []);
  const plain = unique(ws.filter((w) => !stopWords.has(w)).length ? ws.filter((w) => !stopWords.has(w)) : ws)
    .slice(0, limit);
  const topic = plain.filter((w) => !contextWords.has(w));
  const phrases = [plain, ...(topic.length && topic.length !== plain.length ? [topic] : [])];
  const idents = query.match(IDENT) || [];
  const named = new Set(idents.flatMap((m) => m.toLowerCase().match(WORD) || []));
  const keys = idents.map((m) => titleKey(m, aliases));
  for (const p of phrases) {
    keys.push(titleKey(p.join(" "), aliases));
    if (p.length && !named.has(p[p.length - 1])) {
      keys.push(titleKey([...p.slice(0, -1), otherNumber(p[p.length - 1])].join(" "), aliases));
    }
  }
  return unique(keys).filter((k) => k);
}

/** source.retrieval.construct_keywords: Python keywords named as a construct ("the for statement" -> "for"),
 * looked up among the Python sources' titles only. */
export function constructKeywords(query, keywords, constructs, titleKeys) {
  const ws = (query.toLowerCase().match(WORD) || []);
  const found = ws.filter((w, i) => i + 1 < ws.length && keywords.has(w) && constructs.has(ws[i + 1]));
  return unique(found).filter((k) => !titleKeys.includes(k));
}

/** FNV-1a 32-bit of the UTF-8 bytes modulo `shards` (builder.browser_index.shard_of). */
export function shardOf(key, shards) {
  let h = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(key)) h = Math.imul(h ^ byte, 0x01000193) >>> 0;
  return h % shards;
}

const pad3 = (n) => String(n).padStart(3, "0");

export class BrowserIndex {
  /** `base`: URL of the index folder (ends with "/"); `fetchBytes(url) -> Promise<ArrayBuffer>`. */
  constructor(base, fetchBytes) {
    this.base = base;
    this.fetchBytes = fetchBytes;
    this.shards = new Map();  // shard number -> Promise<{head, view, offset}>
    this.texts = new Map();
  }

  async load() {
    const dec = new TextDecoder();
    this.meta = JSON.parse(dec.decode(await this.fetchBytes(this.base + "meta.json")));
    if (this.meta.format !== "supermix-bm25-v1") throw new Error(`${this.base}meta.json: unknown format ${this.meta.format}`);
    const n = this.meta.docs, raw = await this.fetchBytes(this.base + "docs.bin");
    const dv = new DataView(raw);
    this.lengths = new Uint16Array(n);
    this.chunks = new Uint16Array(n);
    for (let i = 0; i < n; i++) {  // little-endian whatever the machine
      this.lengths[i] = dv.getUint16(2 * i, true);
      this.chunks[i] = dv.getUint16(2 * n + 2 * i, true);
    }
    this.sourceOf = new Uint8Array(raw, 4 * n, n);
    this.stopWords = new Set(this.meta.stop_words);
    this.pythonKeywords = new Set(this.meta.python_keywords || []);  // older indexes lack them: no construct lookups
    this.constructWords = new Set(this.meta.construct_words || []);
    this.contextWords = new Set(this.meta.context_words || []);
    return this;
  }

  shard(s) {
    if (!this.shards.has(s)) {
      this.shards.set(s, this.fetchBytes(`${this.base}terms/${pad3(s)}.bin`).then((buf) => {
        const size = new DataView(buf).getUint32(0, true);
        const head = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, size)));
        return { head, bytes: new Uint8Array(buf), offset: 4 + size };
      }));
    }
    return this.shards.get(s);
  }

  async postings(term) {
    const { head, bytes, offset } = await this.shard(shardOf(term, this.meta.term_shards));
    const entry = head.t[term];
    if (!entry) return [0, []];
    const [df, start, idf] = entry;
    const out = [];
    let pos = offset + start, doc = 0;
    const varint = () => {
      let n = 0, shift = 0, byte;
      do { byte = bytes[pos++]; n += (byte & 0x7f) * 2 ** shift; shift += 7; } while (byte >= 0x80);
      return n;
    };
    for (let i = 0; i < df; i++) {
      doc += varint();
      out.push([doc, varint()]);
    }
    return [idf, out];
  }

  /** Map doc -> BM25 score; the arithmetic is written in the Python order so results are bit-identical. */
  async scores(query) {
    const { k1, b, avgdl } = this.meta;
    const out = new Map();
    const terms = queryTerms(query, this.stopWords, this.meta.max_query_terms);
    const lists = await Promise.all(terms.map((t) => this.postings(t)));  // fetch shards in parallel
    for (const [idf, plist] of lists) {
      for (const [doc, f] of plist) {
        const norm = k1 * (1 - b + b * this.lengths[doc] / avgdl);
        out.set(doc, (out.get(doc) ?? 0) + idf * (f * (k1 + 1)) / (f + norm));
      }
    }
    return out;
  }

  async passage(doc) {
    const per = this.meta.passages_per_shard, s = Math.floor(doc / per);
    if (!this.texts.has(s)) {
      this.texts.set(s, this.fetchBytes(`${this.base}text/${pad3(s)}.json`)
        .then((buf) => JSON.parse(new TextDecoder().decode(buf))));
    }
    const [id, title, src, origin, text] = (await this.texts.get(s))[doc % per];
    return { id, title, source: this.meta.sources[src], origin: this.meta.origins[origin], text };
  }

  /** [doc, score] in result order: exact title keys first, then the BM25 top 4k+8. */
  async ranked(query, k = 3) {
    const scores = await this.scores(query);
    if (!scores.size || k <= 0) return [];
    const m = this.meta;
    const keys = titleCandidates(query, this.stopWords, m.max_query_terms, m.key_aliases, this.contextWords);
    const heads = await Promise.all(keys.map((key) => this.shard(shardOf(key, m.term_shards))));
    const constructs = constructKeywords(query, this.pythonKeywords, this.constructWords, keys);
    const cheads = await Promise.all(constructs.map((key) => this.shard(shardOf(key, m.term_shards))));
    const python = (d) => (m.python_sources || []).includes(m.sources[this.sourceOf[d]]);
    const exact = unique([...keys.flatMap((key, i) => heads[i].head.k[key] || []),
      ...constructs.flatMap((key, i) => (cheads[i].head.k[key] || []).filter(python))]);
    const byScore = (a, c) => (c[1] - a[1]) || (a[0] - c[0]);
    const best = new Map();  // source -> [doc, score]
    for (const [doc, s] of exact.map((d) => [d, scores.get(d) ?? 0]).sort(byScore)) {
      const source = m.sources[this.sourceOf[doc]];
      if (scores.has(doc) && !best.has(source)) best.set(source, [doc, s]);
    }
    const order = (s) => { const i = m.source_order.indexOf(s); return i < 0 ? -1 : i; };
    const head = [...best.keys()].sort((a, c) => (order(a) - order(c)) || byScore(best.get(a), best.get(c)))
      .map((s) => best.get(s));
    return [...head, ...[...scores.entries()].sort(byScore).slice(0, 4 * k + 8)];
  }

  /** The k best passages, at most one per record (source.retrieval.Index.search). */
  async search(query, k = 3) {
    const out = new Map();  // record's first doc -> its best [doc, score]
    for (const [doc, score] of await this.ranked(query, k)) {
      const record = doc - this.chunks[doc];
      if (!out.has(record)) out.set(record, [doc, score]);
    }
    const top = [...out.values()].slice(0, k);
    return Promise.all(top.map(async ([doc, score]) => ({ ...(await this.passage(doc)), score: round4(score) })));
  }
}

// Python's round(x, 4) for display; ranking never uses it
const round4 = (x) => Math.round(x * 1e4) / 1e4;
