// The JavaScript port of source/retrieval.py's query side (read that file's docstring): BM25F over the
// static index folder source/retrieval_build.py writes, times the coverage factor and the passage's
// prior (group weight x mention factor), plus the name bonus.
// Every function mirrors one there, step for step, and the arithmetic runs in the same order, so the
// same query gives the same passages, order and scores (tests/test_retrieval_parity.py). Works in a
// page, a worker and node.

const WORD = /[\p{L}\p{N}]+/gu;           // Python's [^\W_]+
const IDENT = /[\p{L}\p{N}_]+(?:\.[\p{L}\p{N}_]+)+|[\p{L}\p{N}_]*_[\p{L}\p{N}_]*/gu;  // json.dumps, skip_keys
const MARKS = /\p{M}/gu;
const FORMAT = "supermix-bm25-v4";

/** Lower-case words with diacritics removed (source.retrieval.words). */
export function words(text) {
  return text.toLowerCase().normalize("NFD").replace(MARKS, "").match(WORD) || [];
}

const unique = (xs) => [...new Set(xs)];
// JSON objects inherit "constructor", "toString", ...: a query word must never find those
const own = (obj, key) => (Object.hasOwn(obj, key) ? obj[key] : undefined);

/** FNV-1a 32-bit of the UTF-8 bytes modulo `shards` (source.retrieval.shard_of). */
export function shardOf(key, shards) {
  let h = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(key)) h = Math.imul(h ^ byte, 0x01000193) >>> 0;
  return h % shards;
}

const pad3 = (n) => String(n).padStart(3, "0");
const byScore = (a, c) => (c[1] - a[1]) || (a[0] - c[0]);  // higher score first, then the lower doc

export class Index {
  /** `base`: URL of the index folder (ends with "/"); `fetchBytes(url) -> Promise<ArrayBuffer>`. */
  constructor(base, fetchBytes) {
    this.base = base;
    this.fetchBytes = fetchBytes;
    this.shards = new Map();  // shard number -> Promise<{head, bytes, offset}>
    this.keyShards = new Map();
    this.texts = new Map();
  }

  async load() {
    const dec = new TextDecoder();
    this.meta = JSON.parse(dec.decode(await this.fetchBytes(this.base + "meta.json")));
    if (this.meta.format !== FORMAT) throw new Error(`${this.base}meta.json: format ${this.meta.format}, this page reads ${FORMAT}`);
    const n = this.meta.docs, raw = await this.fetchBytes(this.base + "docs.bin");
    if (raw.byteLength !== 7 * n) throw new Error(`${this.base}docs.bin: ${raw.byteLength} bytes, expected ${7 * n}`);
    const dv = new DataView(raw);
    this.lengths = new Uint16Array(n);
    this.chunks = new Uint16Array(n);
    this.prior = new Float64Array(n);  // source.retrieval.Index.prior: group weight x mention factor
    const { group_weights: weights, mention_factor: factor } = this.meta;
    for (let i = 0; i < n; i++) {  // little-endian whatever the machine
      this.lengths[i] = dv.getUint16(2 * i, true);
      this.chunks[i] = dv.getUint16(2 * n + 2 * i, true);
      this.prior[i] = weights[dv.getUint8(6 * n + i)] * factor[dv.getUint8(5 * n + i)];
    }
    this.stopWords = new Set(this.meta.stop_words);
    this.articles = new Set(this.meta.articles);
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

  async head(key) { return (await this.shard(shardOf(key, this.meta.term_shards))).head; }

  keyShard(key) {
    const s = shardOf(key, this.meta.key_shards);
    if (!this.keyShards.has(s)) {
      this.keyShards.set(s, this.fetchBytes(`${this.base}keys/${pad3(s)}.json`)
        .then((buf) => JSON.parse(new TextDecoder().decode(buf))));
    }
    return this.keyShards.get(s);
  }

  async stem(word) { return own((await this.head(word)).w, word) ?? word; }

  async idf(stem) { const e = own((await this.head(stem)).t, stem); return e ? e[3] : 0; }

  /** source.retrieval.content_words: distinct query words minus stop words (all if only stop words). */
  contentWords(query) {
    const ws = words(query);
    const kept = ws.filter((w) => !this.stopWords.has(w));
    return unique(kept.length ? kept : ws).slice(0, this.meta.max_query_terms);
  }

  async postings(stem) {
    const { head, bytes, offset } = await this.shard(shardOf(stem, this.meta.term_shards));
    const entry = own(head.t, stem);
    if (!entry) return [0, []];
    const [df, start, , idf] = entry;
    const out = [];
    let pos = offset + start, doc = 0;
    const varint = () => {
      let n = 0, shift = 0, byte;
      do { byte = bytes[pos++]; n += (byte & 0x7f) * 2 ** shift; shift += 7; } while (byte >= 0x80);
      return n;
    };
    for (let i = 0; i < df; i++) {
      doc += varint();
      out.push([doc, varint() / this.meta.freq_scale]);  // frequencies are stored times freq_scale
    }
    return [idf, out];
  }

  /** source.retrieval.Index.scores: Map doc -> BM25F x sqrt(share of the query's idf matched) x prior,
   *  arithmetic in the Python order. */
  async scores(query) {
    const { k1, b, avgdl } = this.meta;
    const out = new Map(), covered = new Map();
    const stems = unique(await Promise.all(this.contentWords(query).map((w) => this.stem(w))));
    const lists = await Promise.all(stems.map((t) => this.postings(t)));  // fetch shards in parallel
    let queryIdf = 0;
    for (const [idf, plist] of lists) {
      for (const [doc, f] of plist) {
        const norm = k1 * (1 - b + b * this.lengths[doc] / avgdl);
        out.set(doc, (out.get(doc) ?? 0) + idf * (f * (k1 + 1)) / (f + norm));
        covered.set(doc, (covered.get(doc) ?? 0) + idf);
      }
      queryIdf += idf;
    }
    for (const [doc, s] of out) out.set(doc, s * Math.sqrt(covered.get(doc) / queryIdf) * this.prior[doc]);
    return out;
  }

  /** source.retrieval.Index.name_keys: [key, content stems] for every name the query may spell. */
  async nameKeys(query) {
    const out = new Map();
    for (const m of query.match(IDENT) || []) {
      const ws = this.aliasedWords(m);
      out.set("=" + ws.join(" "), await Promise.all(ws.filter((w) => !this.stopWords.has(w)).map((w) => this.stem(w))));
    }
    const ws = words(query).slice(0, this.meta.max_name_query_words);
    const stems = await Promise.all(ws.map((w) => (this.stopWords.has(w) ? w : this.stem(w))));
    for (let i = 0; i < ws.length; i++) {
      if (this.articles.has(ws[i])) continue;
      for (let j = i + 1; j <= Math.min(i + this.meta.max_name_words, ws.length); j++) {
        const content = stems.slice(i, j).filter((_, x) => !this.stopWords.has(ws[i + x]));
        if (content.length) out.set(stems.slice(i, j).join(" "), content);
      }
    }
    return [...out.entries()];
  }

  /** source.retrieval.aliased_words: "builtins.str.zfill" -> ["str", "zfill"]. */
  aliasedWords(title) {
    const ws = words(title);
    for (const [prefix, alias] of this.meta.key_aliases) {
      if (ws[0] === prefix) return [...(alias ? alias.split(" ") : []), ...ws.slice(1)];
    }
    return ws;
  }

  /** source.retrieval.Index.named: Map doc -> the name bonus of the best name it goes by. */
  async named(query) {
    const out = new Map();
    let total = 0;
    for (const s of unique(await Promise.all(this.contentWords(query).map((w) => this.stem(w))))) total += await this.idf(s);
    const keys = await this.nameKeys(query);
    const entries = await Promise.all(keys.map(([key]) => this.keyShard(key).then((h) => own(h, key))));
    for (let i = 0; i < keys.length; i++) {
      if (!entries[i]) continue;
      const [logCount, docs] = entries[i];
      let idf = 0;
      for (const st of keys[i][1]) idf += await this.idf(st);
      const bonus = this.meta.name_bonus * Math.max(0, idf - logCount) * idf / total;
      for (const d of docs) if (bonus > (out.get(d) ?? 0)) out.set(d, bonus);
    }
    return out;
  }

  /** source.retrieval.Index.ranked: [doc, score] of the best 4k+8 docs: BM25F plus the name bonus. */
  async ranked(query, k = 3) {
    const scores = await this.scores(query);
    if (!scores.size || k <= 0) return [];
    for (const [d, bonus] of await this.named(query)) scores.set(d, (scores.get(d) ?? 0) + bonus);
    return [...scores.entries()].sort(byScore).slice(0, 4 * k + 8);
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
