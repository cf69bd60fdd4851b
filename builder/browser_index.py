"""The retrieval index in a form a static site can read: BM25 over hashed shards, fetched on demand.

Design choices:
- Static files only (GitHub Pages serves no queries): the browser fetches what a query needs, so a
  visitor downloads a few hundred KB per question instead of the whole 80 MB SQLite file (sqlite-wasm
  would need it all, or HTTP range requests that `python -m http.server` does not answer).
- Layout of `out_dir`:
    meta.json            counts, BM25 constants, stop words, source names, shard counts
    docs.bin             little-endian Uint16 length[N], Uint16 chunk[N], Uint8 source[N]
    terms/NNN.bin        Uint32 header length, JSON header {"t": {term: [df, offset, idf]},
                         "k": {title_key: [doc, ...]}}, then per term df pairs of varints
                         (doc delta, weighted frequency)
    text/NNN.json        [[id, title, source, origin, text], ...] for docs NNN*P .. NNN*P+P-1
  A term or title key lives in shard fnv1a32(utf8) % shards, so a query touches one small file per
  word. Doc numbers follow the SQLite rowids, so the passages of a record stay consecutive.
- Scoring is FTS5's `bm25(fts, 5.0, 1.0)` formula exactly (k1 1.2, b 0.75, f = 5*title hits + text
  hits, length = all tokens, idf floored at 1e-6), and `search` mirrors `source.retrieval.Index.search`:
  exact title keys first (best first passage per source, SOURCE_ORDER), then the BM25 top 4k+8, one
  passage per record. What differs from FTS5 is the tokenizer: FTS5's porter stemmer is replaced by
  the tiny S-stemmer below ("closures" -> "closure"), because a JavaScript copy of SQLite's porter
  would be 300 lines to keep in step. Tests check that the top hits overlap FTS5's.
- idf is computed here and stored, and JavaScript repeats the remaining +, *, / in the same order,
  so both languages produce bit-identical scores and therefore identical rankings (ties: lower doc).
- `BrowserIndex` is the Python reader of these files (the tests' reference for web_static/retrieval.js,
  and what the Python side uses when a reply must match the browser's token for token).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import struct
import unicodedata
from pathlib import Path
from typing import Iterable

from source.files import atomic_write_bytes
from source.retrieval import (CONSTRUCT_WORDS, CONTEXT_WORDS, KEY_ALIASES, MAX_QUERY_TERMS, PYTHON_KEYWORDS, PYTHON_SOURCES,
                              SOURCE_ORDER, STOP_WORDS, TEXT_WEIGHT, TITLE_WEIGHT, Passage, construct_keywords,
                              title_candidates)

FORMAT = "supermix-bm25-v1"
K1, B = 1.2, 0.75
PASSAGES_PER_SHARD = 500  # ~120 KB of JSON per text shard with the default corpus (docs/benchmarks.md)
TERM_SHARD_BYTES = 96 * 1024  # target size of one terms/NNN.bin
_WORD = re.compile(r"[^\W_]+")


# ----------------------------------------------------------------------------- text -> terms (mirrored in JS)

def words(text: str) -> list[str]:
    """Lower-case words with diacritics removed ("Naïve" -> "naive"), like FTS5's unicode61."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    return _WORD.findall(text)


def stem(word: str) -> str:
    """Harman's S-stemmer: plurals only, so it is easy to keep identical in JavaScript."""
    if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    return [stem(w) for w in words(text)]


def query_terms(query: str, stop_words: Iterable[str] = STOP_WORDS, limit: int = MAX_QUERY_TERMS) -> list[str]:
    """Distinct stemmed query words minus stop words (all of them if only stop words), at most `limit`."""
    stop = set(stop_words)
    ws = words(query)
    kept = [w for w in ws if w not in stop] or ws
    return list(dict.fromkeys(stem(w) for w in dict.fromkeys(kept)))[:limit]


def shard_of(key: str, shards: int) -> int:
    """FNV-1a 32-bit of the UTF-8 bytes, modulo the shard count (the same function is in retrieval.js)."""
    h = 0x811C9DC5
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % shards


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, pos
        shift += 7


# ----------------------------------------------------------------------------- writer

def write_browser_index(index_sqlite: Path, out_dir: Path, sources: tuple[str, ...] | None = None,
                        passages_per_shard: int = PASSAGES_PER_SHARD) -> dict:
    """Write the browser index of `index_sqlite` (a `builder index build` file) into `out_dir`.

    `sources=None` keeps every source the SQLite index holds. Returns meta.json's content plus
    "bytes" (per part and total). ValueError when the file is not an index or nothing is selected.
    """
    index_sqlite, out_dir = Path(index_sqlite), Path(out_dir)
    if not index_sqlite.is_file():
        raise FileNotFoundError(f"{index_sqlite} not found: build it with `builder index build`")
    con = sqlite3.connect(f"{index_sqlite.resolve().as_uri()}?mode=ro", uri=True)
    try:
        try:
            db_meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{index_sqlite} is not a retrieval index ({e})") from None
        where, args = "", []
        if sources is not None:
            where, args = f" WHERE source IN ({', '.join('?' * len(sources))})", list(sources)
        rows = con.execute(f"SELECT id, title, source, origin, text, chunk, title_key FROM passages{where} "
                           "ORDER BY rowid", args).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{index_sqlite}: no passages from sources {sources}")

    source_names = sorted({r[2] for r in rows})
    origin_names = sorted({r[3] for r in rows})
    src_no = {s: i for i, s in enumerate(source_names)}
    org_no = {s: i for i, s in enumerate(origin_names)}
    n = len(rows)
    lengths, postings, keys = [], {}, {}  # postings: term -> [doc, f, doc, f, ...]
    for doc, (_, title, _, _, text, chunk, key) in enumerate(rows):
        title_terms, text_terms = terms(title), terms(text)
        lengths.append(len(title_terms) + len(text_terms))
        f: dict[str, int] = {}
        for t in title_terms:
            f[t] = f.get(t, 0) + int(TITLE_WEIGHT)
        for t in text_terms:
            f[t] = f.get(t, 0) + int(TEXT_WEIGHT)
        for t, v in f.items():
            postings.setdefault(t, []).extend((doc, v))
        if chunk == 0 and key:
            keys.setdefault(key, []).append(doc)
    avgdl = sum(lengths) / n

    # encode each term's postings once, then spread terms and title keys over the shards
    encoded: dict[str, tuple[int, float, bytes]] = {}
    for t, pl in postings.items():
        df, buf, prev = len(pl) // 2, bytearray(), 0
        for i in range(0, len(pl), 2):
            _varint(pl[i] - prev, buf)
            _varint(pl[i + 1], buf)
            prev = pl[i]
        idf = math.log((n - df + 0.5) / (df + 0.5))
        encoded[t] = (df, idf if idf > 0 else 1e-6, bytes(buf))
    estimate = sum(len(b) + len(t) + 30 for t, (_, _, b) in encoded.items()) + sum(len(k) + 8 * len(d)
                                                                                   for k, d in keys.items())
    shards = max(1, round(estimate / TERM_SHARD_BYTES))
    head = [{"t": {}, "k": {}} for _ in range(shards)]
    body = [bytearray() for _ in range(shards)]
    for t in sorted(encoded):
        df, idf, data = encoded[t]
        s = shard_of(t, shards)
        head[s]["t"][t] = [df, len(body[s]), idf]
        body[s] += data
    for k in sorted(keys):
        head[shard_of(k, shards)]["k"][k] = keys[k]

    sizes = {"docs": 0, "terms": 0, "text": 0}
    for old in [*out_dir.glob("terms/*.bin"), *out_dir.glob("text/*.json")]:
        old.unlink()  # a rebuild with fewer shards must not leave stale ones behind
    for s in range(shards):
        header = json.dumps(head[s], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        data = struct.pack("<I", len(header)) + header + bytes(body[s])
        atomic_write_bytes(out_dir / "terms" / f"{s:03d}.bin", data)
        sizes["terms"] += len(data)
    text_shards = (n + passages_per_shard - 1) // passages_per_shard
    for s in range(text_shards):
        part = [[r[0], r[1], src_no[r[2]], org_no[r[3]], r[4]]
                for r in rows[s * passages_per_shard:(s + 1) * passages_per_shard]]
        data = json.dumps(part, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        atomic_write_bytes(out_dir / "text" / f"{s:03d}.json", data)
        sizes["text"] += len(data)
    docs = (struct.pack(f"<{n}H", *(min(x, 0xFFFF) for x in lengths)) + struct.pack(f"<{n}H", *(r[5] for r in rows))
            + bytes(src_no[r[2]] for r in rows))
    atomic_write_bytes(out_dir / "docs.bin", docs)
    sizes["docs"] = len(docs)

    counts = {s: 0 for s in source_names}
    for r in rows:
        counts[r[2]] += 1
    meta = {"format": FORMAT, "docs": n, "avgdl": avgdl, "k1": K1, "b": B, "terms": len(encoded),
            "term_shards": shards, "passages_per_shard": passages_per_shard, "text_shards": text_shards,
            "sources": source_names, "origins": origin_names, "counts": counts,
            "stop_words": sorted(STOP_WORDS), "max_query_terms": MAX_QUERY_TERMS,
            "source_order": list(SOURCE_ORDER), "key_aliases": [list(a) for a in KEY_ALIASES],
            "python_keywords": sorted(PYTHON_KEYWORDS), "construct_words": sorted(CONSTRUCT_WORDS),
            "python_sources": list(PYTHON_SOURCES), "context_words": sorted(CONTEXT_WORDS),
            "index_manifest_sha256": db_meta.get("manifest_sha256"), "max_chars": db_meta.get("max_chars")}
    meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    atomic_write_bytes(out_dir / "meta.json", meta_bytes)
    sizes["meta"] = len(meta_bytes)
    return {**meta, "bytes": {**sizes, "total": sum(sizes.values())}}


# ----------------------------------------------------------------------------- reader (the JS reference)

class BrowserIndex:
    """Reads a `write_browser_index` folder and searches it exactly as web_static/retrieval.js does."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: write it with builder.browser_index.write_browser_index")
        self.meta = json.loads(meta_file.read_text("utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: format {self.meta.get('format')!r}, this code reads {FORMAT}")
        n = self.meta["docs"]
        raw = (self.path / "docs.bin").read_bytes()
        self.lengths = struct.unpack_from(f"<{n}H", raw, 0)
        self.chunks = struct.unpack_from(f"<{n}H", raw, 2 * n)
        self.source_of = raw[4 * n:5 * n]
        self._shards: dict[int, tuple[dict, bytes, int]] = {}
        self._texts: dict[int, list] = {}

    def __len__(self) -> int:
        return int(self.meta["docs"])

    def _shard(self, s: int) -> tuple[dict, bytes, int]:
        if s not in self._shards:
            data = (self.path / "terms" / f"{s:03d}.bin").read_bytes()
            size = struct.unpack_from("<I", data)[0]
            self._shards[s] = (json.loads(data[4:4 + size].decode("utf-8")), data, 4 + size)
        return self._shards[s]

    def _postings(self, term: str) -> tuple[float, list[tuple[int, int]]]:
        head, data, base = self._shard(shard_of(term, self.meta["term_shards"]))
        if term not in head["t"]:
            return 0.0, []
        df, offset, idf = head["t"][term]
        out, pos, doc = [], base + offset, 0
        for _ in range(df):
            delta, pos = _read_varint(data, pos)
            f, pos = _read_varint(data, pos)
            doc += delta
            out.append((doc, f))
        return idf, out

    def scores(self, query: str) -> dict[int, float]:
        """doc -> BM25 score (higher is better) for every doc matching a query term."""
        k1, b, avgdl = self.meta["k1"], self.meta["b"], self.meta["avgdl"]
        out: dict[int, float] = {}
        for t in query_terms(query, self.meta["stop_words"], self.meta["max_query_terms"]):
            idf, plist = self._postings(t)
            for doc, f in plist:
                norm = k1 * (1 - b + b * self.lengths[doc] / avgdl)
                out[doc] = out.get(doc, 0.0) + idf * (f * (k1 + 1)) / (f + norm)
        return out

    def passage(self, doc: int) -> Passage:
        s = doc // self.meta["passages_per_shard"]
        if s not in self._texts:
            self._texts[s] = json.loads((self.path / "text" / f"{s:03d}.json").read_text("utf-8"))
        pid, title, src, origin, text = self._texts[s][doc % self.meta["passages_per_shard"]]
        return Passage(pid, title, self.meta["sources"][src], self.meta["origins"][origin], text)

    def ranked(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        """(doc, score) in result order before collapsing: exact titles, then the BM25 top 4k+8."""
        scores = self.scores(query)
        if not scores or k <= 0:
            return []
        ranked: list[tuple[int, float]] = []
        exact: list[int] = []
        keys = title_candidates(query)
        for key in keys:
            head, _, _ = self._shard(shard_of(key, self.meta["term_shards"]))
            exact += head["k"].get(key, [])
        python = {i for i, name in enumerate(self.meta["sources"]) if name in PYTHON_SOURCES}
        for key in construct_keywords(query, keys):
            head, _, _ = self._shard(shard_of(key, self.meta["term_shards"]))
            exact += [d for d in head["k"].get(key, []) if self.source_of[d] in python]
        order = {name: i for i, name in enumerate(self.meta["source_order"])}
        best: dict[str, tuple[int, float]] = {}
        for doc in sorted(set(exact), key=lambda d: (-scores.get(d, 0.0), d)):
            if doc in scores:  # FTS5 returns only rows that match a query term
                best.setdefault(self.meta["sources"][self.source_of[doc]], (doc, scores[doc]))
        ranked += [best[s] for s in sorted(best, key=lambda s: (order.get(s, -1), -best[s][1], best[s][0]))]
        ranked += sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:4 * k + 8]
        return ranked

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` best passages, at most one per record (like `source.retrieval.Index.search`)."""
        out: dict[int, Passage] = {}  # record's first doc -> its best passage
        for doc, score in self.ranked(query, k):
            record = doc - self.chunks[doc]
            if record not in out:
                p = self.passage(doc)
                p.score = round(score, 4)
                out[record] = p
        return list(out.values())[:k]
