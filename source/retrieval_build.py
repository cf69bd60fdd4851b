"""Building the retrieval index: the built corpus -> passages -> one folder of static files.

Design choices:
- One format for every reader: the runtime, `builder sft-data`, `builder eval` and the export gates
  read it with `source.retrieval.Index`, and the site serves the same folder to
  web_static/retrieval.js. GitHub Pages answers no queries, so the folder is static files a browser
  fetches per query word (a few hundred KB per question, not the whole index).
- Layout (little-endian):
    meta.json        counts, BM25 constants, field weights, stop words, source names, shard counts
    docs.bin         Uint16 length[N], Uint16 chunk[N], Uint8 source[N], Uint8 mentions[N] (manual
                     sections mentioning a docstring's API, capped at MAX_MENTIONS; 0 elsewhere),
                     Uint8 group[N] (meta.json's groups: the source, or a part of the manual)
    terms/NNN.bin    Uint32 header length, JSON header {"t": {stem: [df, offset, bytes, idf]},
                     "w": {word: stem}}, then per stem df pairs of varints (doc delta, weighted
                     frequency x meta's freq_scale: integers although an anchor word weighs 0.5)
    keys/NNN.json    {name key: [ln(records with that name), [first doc of each record, ...]]}
    text/NNN.json    [[id, title, source no, origin no, text], ...] for docs NNN*P .. NNN*P+P-1
  A stem, word or name key lives in shard fnv1a32(utf8) % shards, so a query touches one small file
  per word (name keys have smaller shards of their own: a query looks many of them up).
- Stemming (Snowball's English stemmer, "reversing" -> "revers", "closures" -> "closur") runs here,
  at build time, for every word of the corpus; "w" stores each word whose stem differs. Queries look
  their words up instead of stemming, so the JavaScript reader needs no stemmer of its own and both
  readers agree by construction. A query word the corpus never uses matches nothing either way.
- Records are cut into passages of at most `max_chars` characters at the best break inside the
  window: a paragraph break, then a line break, then a sentence end, then any space, preferring the
  strongest break in the window's second half. Only whitespace at the cuts is dropped, so the
  passages together hold every character of the record. Passage ids are "{record_id}#{n}", stable
  across rebuilds. Doc numbers keep a record's passages consecutive.
- A docstring record's first passage also carries, as index words only, what the Python manual
  says about the same API (`source.api_manual`): the manual's wording ("Common pathname
  manipulations", "segments") is how people ask. Those borrowed words count once each, and only
  BORROWED_LENGTH of them towards the passage length, so a long manual entry does not bury the
  docstring's own words; b is 0.5 rather than BM25's usual 0.75 for the same reason. The shown text
  does not change.
- Anchors: the headings of the manual sections whose text mentions the API ("How do I delete a
  file?" mentions shutil.rmtree) are filed under the same passage at ANCHOR_WEIGHT (half a text word)
  and count nothing towards its length, the way a web page is found by the words of links to it.
- idf and ln(records per name) are computed here and stored, so both readers repeat only +, *, / in the same order and get
  bit-identical scores.
- The folder is written beside the target and swapped in: a failed build leaves the old index.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from datetime import datetime, timezone
from pathlib import Path

import snowballstemmer
from tqdm import tqdm

from source.api_manual import anchor_table, manual_anchors, manual_entries, manual_entry
from source.corpus.build import iter_records
from source.files import sha256_file
from source.retrieval import (GROUP_WEIGHTS, MAX_MENTIONS, MENTION_PRIOR, B, DEFAULT_EXCLUDED, FORMAT, FREQ_SCALE, K1, KEY_ALIASES, MAX_QUERY_TERMS,
                              PASSAGES_PER_SHARD, STOP_WORDS, ANCHOR_WEIGHT, TEXT_WEIGHT, TITLE_WEIGHT, ARTICLES, MAX_NAME_QUERY_WORDS, MAX_NAME_WORDS,
                              NAME_BONUS, _IDENT, aliased_words, shard_of, words)

TERM_SHARD_BYTES = 96 * 1024  # target size of one terms/NNN.bin
KEY_SHARD_BYTES = 16 * 1024  # keys/NNN.json: a query looks up many keys, so these stay small
BORROWED_LENGTH = 0.3  # share of a manual entry's words counted in its docstring passage's length
_UNDERLINE = re.compile(r"([*=~^#-])\1{2,}")
_FOLDOC_ALSO = re.compile(r"[^(]* \(also: ([^)]*)\)$")
_WORDNET_ALSO = re.compile(r"^[^:]* \((?:noun|verb|adjective|adverb)\): .*? Also: (.+?)\.(?: Examples?:|$)")


def chunk_text(text: str, max_chars: int = 600) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` at the best whitespace break (see the docstring)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text, out, pos = text.strip(), [], 0
    while len(text) - pos > max_chars:
        window = text[pos:pos + max_chars + 1]  # a break right after max_chars characters still fits
        best, best_rank = None, (-2, 0)
        for m in re.finditer(r"\s+", window):
            start = m.start()
            if start == 0:
                continue
            ws = m.group()
            kind = 3 if ws.count("\n") >= 2 else 2 if "\n" in ws else 1 if window[start - 1] in ".!?:;" else 0
            rank = (kind if 2 * start >= max_chars else -1, start)  # strong breaks only in the 2nd half
            if rank > best_rank:
                best, best_rank = m, rank
        if best is None:  # no space at all in the window: hard cut
            out.append(window[:max_chars])
            pos += max_chars
        else:
            out.append(window[:best.start()])
            pos += best.end()
        while pos < len(text) and text[pos].isspace():  # the match may have been cut by the window
            pos += 1
    if pos < len(text):
        out.append(text[pos:])
    return out


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_index(data_dir: str | Path, out_dir: str | Path, sources: tuple[str, ...] | None = None,
                max_chars: int = 600, passages_per_shard: int = PASSAGES_PER_SHARD, progress: bool = True) -> dict:
    """Index every record of both splits of a built corpus into the folder `out_dir`; return stats.

    `sources=None` means every source except chitchat. FileNotFoundError when the corpus is missing,
    ValueError when nothing is left to index; the old index is then untouched.
    """
    data, out = Path(data_dir), Path(out_dir)
    manifest = data / "manifest.json"
    if not manifest.is_file() or not any(data.glob("train-*.parquet")):
        raise FileNotFoundError(f"no built corpus in {data} (manifest.json and train-*.parquet): "
                                "run `builder data build` first")
    if max_chars < 50:
        raise ValueError(f"max_chars must be at least 50, got {max_chars}")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file()):
        raise ValueError(f"{out} exists and is not a retrieval index folder: choose another --out")
    t0 = time.time()
    records, seen = [], set()
    for split in ("train", "val"):
        for r in tqdm(iter_records(data, split), desc=f"read {split}", unit="rec", disable=not progress, leave=False):
            if r["id"] in seen:  # weight > 1 repeats a record under the same id
                continue
            seen.add(r["id"])
            if not ((r["source"] in DEFAULT_EXCLUDED) if sources is None else (r["source"] not in sources)):
                records.append(r)
    stemmer = snowballstemmer.stemmer("english")
    stems: dict[str, str] = {}

    def stem_all(ws: list[str]) -> list[str]:
        missing = [w for w in dict.fromkeys(ws) if w not in stems]
        if missing:
            stems.update(zip(missing, stemmer.stemWords(missing)))
        return [stems[w] for w in ws]

    manual = manual_entries(records)
    anchors = anchor_table(records)
    rows = []
    for r in records:
        names = record_names(r["title"], r["text"])
        headings = manual_anchors(r["title"], anchors) if r["source"] == "docstrings" else []
        anchor_text = "\n".join(headings)
        borrowed = manual_entry(r["title"], manual) if r["source"] == "docstrings" else ""
        for n, piece in enumerate(chunk_text(r["text"], max_chars)):
            rows.append((f"{r['id']}#{n}", r["title"], r["source"], r["origin"], piece, n, names,
                         borrowed if n == 0 else "", anchor_text if n == 0 else "", min(len(headings), MAX_MENTIONS)))
    del records
    if not rows:
        wanted = ", ".join(sources) if sources is not None else "all but " + ", ".join(DEFAULT_EXCLUDED)
        raise ValueError(f"nothing to index in {data} (sources: {wanted})")

    n = len(rows)
    lengths, postings, keys = [], {}, {}  # postings: stem -> [doc, f, doc, f, ...]
    for doc, (_, title, _, _, text, chunk, names, borrowed, anchor_text, _) in enumerate(
            tqdm(rows, desc="index", unit="psg", disable=not progress, leave=False)):
        title_stems = stem_all([w for name in (title, *names) for w in words(name)])
        text_stems = stem_all(words(text))
        borrowed_stems = stem_all(words(borrowed))
        anchor_stems = stem_all(words(anchor_text))
        lengths.append(len(title_stems) + len(text_stems) + round(BORROWED_LENGTH * len(borrowed_stems)))
        # frequencies are stored times FREQ_SCALE so a weight below a text word's stays an integer
        f: dict[str, int] = {}
        for t in title_stems:
            f[t] = f.get(t, 0) + round(TITLE_WEIGHT * FREQ_SCALE)
        for t in (*text_stems, *borrowed_stems):
            f[t] = f.get(t, 0) + round(TEXT_WEIGHT * FREQ_SCALE)
        for t in anchor_stems:
            f[t] = f.get(t, 0) + round(ANCHOR_WEIGHT * FREQ_SCALE)
        for t, v in f.items():
            postings.setdefault(t, []).extend((doc, v))
        if chunk == 0:
            for key in dict.fromkeys(name_key(name, stem_all) for name in (title, *names)):
                if key:
                    keys.setdefault(key, []).append(doc)
    avgdl = sum(lengths) / n

    encoded: dict[str, tuple[int, float, bytes]] = {}
    for t, pl in postings.items():
        df, buf, prev = len(pl) // 2, bytearray(), 0
        for i in range(0, len(pl), 2):
            _varint(pl[i] - prev, buf)
            _varint(pl[i + 1], buf)
            prev = pl[i]
        idf = math.log((n - df + 0.5) / (df + 0.5))
        encoded[t] = (df, idf if idf > 0 else 1e-6, bytes(buf))
    variants = {w: s for w, s in stems.items() if w != s}
    estimate = (sum(len(b) + len(t) + 36 for t, (_, _, b) in encoded.items())
                + sum(len(w) + len(s) + 6 for w, s in variants.items()))
    shards = max(1, round(estimate / TERM_SHARD_BYTES))
    key_shards = max(1, round(sum(len(k) + 8 * len(d) for k, d in keys.items()) / KEY_SHARD_BYTES))
    head = [{"t": {}, "w": {}} for _ in range(shards)]
    key_head = [{} for _ in range(key_shards)]
    body = [bytearray() for _ in range(shards)]
    for t in sorted(encoded):
        df, idf, blob = encoded[t]
        s = shard_of(t, shards)
        head[s]["t"][t] = [df, len(body[s]), len(blob), idf]
        body[s] += blob
    for k in sorted(keys):
        key_head[shard_of(k, key_shards)][k] = [math.log(len(keys[k])), keys[k]]  # readers never call log
    for w in sorted(variants):
        head[shard_of(w, shards)]["w"][w] = variants[w]

    source_names = sorted({r[2] for r in rows})
    origin_names = sorted({r[3] for r in rows})
    src_no = {s: i for i, s in enumerate(source_names)}
    org_no = {s: i for i, s in enumerate(origin_names)}
    groups = [prior_group(r[0], r[2]) for r in rows]
    group_names = sorted(set(groups))
    if len(group_names) > 256:
        raise ValueError(f"{len(group_names)} prior groups, docs.bin holds at most 256")
    group_no = {g: i for i, g in enumerate(group_names)}
    counts = {s: 0 for s in source_names}
    for r in rows:
        counts[r[2]] += 1
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sizes = {"docs": 0, "terms": 0, "keys": 0, "text": 0}
        for s in range(key_shards):
            blob = json.dumps(key_head[s], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            _write(tmp / "keys" / f"{s:03d}.json", blob)
            sizes["keys"] += len(blob)
        for s in range(shards):
            header = json.dumps(head[s], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            blob = struct.pack("<I", len(header)) + header + bytes(body[s])
            _write(tmp / "terms" / f"{s:03d}.bin", blob)
            sizes["terms"] += len(blob)
        text_shards = (n + passages_per_shard - 1) // passages_per_shard
        for s in range(text_shards):
            part = [[r[0], r[1], src_no[r[2]], org_no[r[3]], r[4]]
                    for r in rows[s * passages_per_shard:(s + 1) * passages_per_shard]]
            blob = json.dumps(part, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            _write(tmp / "text" / f"{s:03d}.json", blob)
            sizes["text"] += len(blob)
        docs = (struct.pack(f"<{n}H", *(min(x, 0xFFFF) for x in lengths)) + struct.pack(f"<{n}H", *(r[5] for r in rows))
                + bytes(src_no[r[2]] for r in rows) + bytes(r[9] for r in rows) + bytes(group_no[g] for g in groups))
        _write(tmp / "docs.bin", docs)
        sizes["docs"] = len(docs)
        meta = {"format": FORMAT, "docs": n, "records": len({r[0].rsplit("#", 1)[0] for r in rows}), "avgdl": avgdl,
                "k1": K1, "b": B, "title_weight": TITLE_WEIGHT, "text_weight": TEXT_WEIGHT,
                "anchor_weight": ANCHOR_WEIGHT, "groups": group_names,
                "group_weights": [GROUP_WEIGHTS.get(g, GROUP_WEIGHTS.get(g.split("/")[0], 1.0)) for g in group_names],
                # readers index this table by the mention byte instead of calling log (exact in JS too)
                "mention_factor": [1 + MENTION_PRIOR * math.log1p(m) for m in range(MAX_MENTIONS + 1)], "freq_scale": FREQ_SCALE, "anchored": sum(bool(r[8]) for r in rows), "stems": len(encoded),
                "term_shards": shards, "key_shards": key_shards, "passages_per_shard": passages_per_shard, "text_shards": text_shards,
                "sources": source_names, "origins": origin_names, "counts": counts,
                "stop_words": sorted(STOP_WORDS), "max_query_terms": MAX_QUERY_TERMS,
                "key_aliases": [list(a) for a in KEY_ALIASES], "articles": sorted(ARTICLES), "name_bonus": NAME_BONUS,
                "max_name_words": MAX_NAME_WORDS, "max_name_query_words": MAX_NAME_QUERY_WORDS, "max_chars": max_chars,
                "borrowed_length": BORROWED_LENGTH, "manual_entries": sum(bool(r[7]) for r in rows),
                "manifest_sha256": sha256_file(manifest), "data_dir": str(data),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
        _write(tmp / "meta.json", meta_bytes)
        sizes["meta"] = len(meta_bytes)
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(sizes.values())
    return {**meta, "passages": n, "bytes": {**sizes, "total": total}, "seconds": round(time.time() - t0, 2),
            "path": str(out)}


def prior_group(passage_id: str, source: str) -> str:
    """The group whose weight a passage's score takes: its source, or "python-docs/<part>" for a page
    in a folder of the Python manual ("python-docs:whatsnew/3.8.rst.txt#..." -> "python-docs/whatsnew")."""
    path = passage_id.split(":", 1)[1] if ":" in passage_id else ""
    return f"{source}/{path.split('/', 1)[0]}" if source == "python-docs" and "/" in path.split("#", 1)[0] else source


def record_names(title: str, text: str) -> list[str]:
    """Other names a record goes by, read from the layouts the corpus readers write: a heading
    underlined on the next line ('The "for" statement' over "****"), FOLDOC's "(also: a, b)" after
    the headword, WordNet's "Also: a, b." synonyms. They count as title words and exact titles, so
    "verbose" finds the synset titled "long-winded"."""
    lines = text.split("\n", 2)
    names = []
    if len(lines) > 1 and _UNDERLINE.fullmatch(lines[1].strip()) and lines[0].strip() != title:
        names.append(lines[0].strip())
    if m := _FOLDOC_ALSO.match(lines[0]):
        names += m.group(1).split(", ")
    if m := _WORDNET_ALSO.search(lines[0]):
        names += m.group(1).split(", ")
    return [n for n in dict.fromkeys(n.strip() for n in names) if n and n != title]


def name_key(name: str, stem_all) -> str:
    """The key a name is found under; `Index.name_keys` forms the same keys from a query."""
    ws = aliased_words(name)
    while ws and ws[0] in ARTICLES:
        ws = ws[1:]
    if not any(w not in STOP_WORDS for w in ws):
        return ""  # "for", "the": names nobody looks up by a stop word alone
    if _IDENT.fullmatch(name.strip()):
        return "=" + " ".join(ws)  # an identifier is looked up as written: json.dumps is not json.dump
    return " ".join(stem_all([w])[0] if w not in STOP_WORDS else w for w in ws)
