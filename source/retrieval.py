"""Retrieval: the built corpus -> passages -> one SQLite FTS5 file -> BM25 search with citation ids.

Design choices:
- One SQLite file, nothing else: a `passages` table (the text, stored once), an external-content
  FTS5 table over it (`porter unicode61`: "closures" finds "closure"; "json.dumps" is indexed as
  "json" "dumps"), and a `meta` table (manifest sha256, created, max_chars, counts). Python's
  standard library reads it; no server, no extra package.
- Records are cut into passages of at most `max_chars` characters at the best break inside the
  window: a paragraph break, then a line break, then a sentence end, then any space, preferring the
  strongest break in the window's second half. Only whitespace at the cuts is dropped, so the
  passages together hold every character of the record. A run of `max_chars` characters without
  any space (a base64 blob) is the one place a cut may fall mid-word.
- Passage ids are "{record_id}#{n}": stable across rebuilds of the same corpus, readable in
  citations, and `get(id)` takes them back. Every chunk keeps its record's title.
- Ranking is `bm25(fts, 5.0, 1.0)`: a word in the title counts five times one in the text.
  Results hold at most one passage per record (its best), so the top 3 are three sources.
- User queries never reach FTS5 syntax: word tokens are pulled out, stop words dropped (unless
  nothing else is left), each quoted and OR-ed. `json.dumps()`, `"`, `AND`, `*` and `-` are text.
- Exact titles win: a query naming a title ("json.dumps", "define ephemeral" -> "ephemeral") also
  runs a cheap B-tree lookup on a normalized title key ("json dumps"), in either number and without
  words that only set the scene ("What are regular expressions in Python?" -> "regular expression").
  Python keywords are English stop words, so a keyword right before a construct word ("the for
  statement", "a while loop", "lambda expressions") is looked up too, among the Python sources'
  titles only: "for" is the pydoc topic on the for statement, WordNet's "try" (to attempt) is not
  wanted. The first passages of those records come first, the best one per source in SOURCE_ORDER
  ("closure": FOLDOC's, then WordNet's), then the BM25 ranking.
- Builds go to a temp file in the target folder and are `os.replace`d in: a failed build leaves
  the old index as it was. `Index` opens the file read-only (`mode=ro` URI).
"""

from __future__ import annotations

import json
import keyword
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from source.corpus.build import iter_records
from source.files import sha256_file

SCHEMA_VERSION = 1
TITLE_WEIGHT, TEXT_WEIGHT = 5.0, 1.0
DEFAULT_EXCLUDED = ("chitchat",)  # casual chat is training text, not something to cite
MAX_QUERY_TERMS = 32  # a pasted page should not turn into a 500-term OR
STOP_WORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below
between both but by can could did do does doing done down during each either else few for from
further had has have having he her here hers him his how i if in into is it its itself just me
more most my no nor not of off on once only or other our out over own please same she should so
some such than that the their them then there these they this those through to too under until up
us very was we were what when where which while who whom why will with would you your
define definition defined meaning mean means explain describe tell show give example examples
""".split())  # the last line: words that ask for a definition rather than name a topic

# "for statement", "while loop", "lambda expression": the keyword names the topic (see title_candidates)
PYTHON_KEYWORDS = frozenset(k.lower() for k in keyword.kwlist + keyword.softkwlist if k.isalpha())
CONSTRUCT_WORDS = frozenset("""
statement statements loop loops clause clauses keyword keywords expression expressions operator operators
block blocks
""".split())
PYTHON_SOURCES = ("pydoc-topics", "docstrings", "python-docs")
# "slicing in Python", "a closure in programming": the words set the scene, the title is "slicing"
CONTEXT_WORDS = frozenset("python programming computing computer".split())

# Docstring titles name where a function lives; people name it as they import it.
KEY_ALIASES = (("builtins ", ""), ("posixpath ", "os path "))
# Exact title matches take one passage per source, in this order: your own files (any source name
# not listed) first, then the Python sources, the computing dictionary, the English dictionary.
SOURCE_ORDER = ("pydoc-topics", "docstrings", "python-docs", "foldoc", "wordnet", "chitchat")

_WORD = re.compile(r"[^\W_]+")
_IDENT = re.compile(r"\w+(?:\.\w+)+|\w*_\w*")  # json.dumps, os.path.join, skip_keys
_SPACE = re.compile(r"\s+")


@dataclass
class Passage:
    id: str
    title: str
    source: str
    origin: str
    text: str
    score: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def title_key(title: str) -> str:
    """The normalized title used for exact matches: "json.dumps()" -> "json dumps"."""
    key = " ".join(_WORD.findall(title.lower()))
    for prefix, alias in KEY_ALIASES:
        if key.startswith(prefix):
            return alias + key[len(prefix):]
    return key


# ----------------------------------------------------------------------------- chunking

def chunk_text(text: str, max_chars: int = 600) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` at the best whitespace break (see the docstring)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text, out, pos = text.strip(), [], 0
    while len(text) - pos > max_chars:
        window = text[pos:pos + max_chars + 1]  # a break right after max_chars characters still fits
        best, best_rank = None, (-2, 0)
        for m in _SPACE.finditer(window):
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


# ----------------------------------------------------------------------------- build

def build_index(data_dir: str | Path, db_path: str | Path, sources: tuple[str, ...] | None = None,
                max_chars: int = 600, progress: bool = True) -> dict:
    """Index every record of both splits of a built corpus into `db_path`; return stats.

    `sources=None` means every source except chitchat. Raises FileNotFoundError when the corpus is
    missing and ValueError when nothing is left to index; the old index is then untouched.
    """
    data, db = Path(data_dir), Path(db_path)
    manifest = data / "manifest.json"
    if not manifest.is_file() or not any(data.glob("train-*.parquet")):
        raise FileNotFoundError(f"no built corpus in {data} (manifest.json and train-*.parquet): "
                                "run `builder data build` first")
    if max_chars < 50:
        raise ValueError(f"max_chars must be at least 50, got {max_chars}")
    t0 = time.time()
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA page_size = 8192;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE passages (rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
                                   source TEXT NOT NULL, origin TEXT NOT NULL, text TEXT NOT NULL,
                                   chunk INTEGER NOT NULL, title_key TEXT NOT NULL);
            CREATE VIRTUAL TABLE fts USING fts5(title, text, content='passages', content_rowid='rowid',
                                                tokenize='porter unicode61 remove_diacritics 2');
        """)
        seen: set[str] = set()
        counts: dict[str, int] = {}
        records = 0
        rows = []
        bar = tqdm(desc="index", unit="rec", disable=not progress, leave=False)
        for split in ("train", "val"):
            for r in iter_records(data, split):
                bar.update()
                if r["id"] in seen:  # weight > 1 repeats a record under the same id
                    continue
                seen.add(r["id"])
                if (r["source"] in DEFAULT_EXCLUDED) if sources is None else (r["source"] not in sources):
                    continue
                records += 1
                key = title_key(r["title"])
                for n, piece in enumerate(chunk_text(r["text"], max_chars)):
                    rows.append((f"{r['id']}#{n}", r["title"], r["source"], r["origin"], piece, n, key))
                    counts[r["source"]] = counts.get(r["source"], 0) + 1
                if len(rows) >= 20_000:
                    con.executemany("INSERT INTO passages (id, title, source, origin, text, chunk, title_key) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    rows.clear()
        bar.close()
        con.executemany("INSERT INTO passages (id, title, source, origin, text, chunk, title_key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        if not counts:
            wanted = ", ".join(sources) if sources is not None else "all but " + ", ".join(DEFAULT_EXCLUDED)
            raise ValueError(f"nothing to index in {data} (sources: {wanted})")
        con.execute("CREATE INDEX passages_title_key ON passages (title_key, chunk)")
        con.execute("INSERT INTO fts (fts) VALUES ('rebuild')")
        con.execute("INSERT INTO fts (fts) VALUES ('optimize')")  # one b-tree per term: faster queries
        meta = {"schema_version": SCHEMA_VERSION, "manifest_sha256": sha256_file(manifest), "data_dir": str(data),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "max_chars": max_chars,
                "records": records, "passages": sum(counts.values()), "counts": dict(sorted(counts.items()))}
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.commit()
        con.execute("VACUUM")  # pages of the incrementally built indexes are ~70% full: -7% size
        con.close()
        os.replace(tmp, db)
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    return {**meta, "seconds": round(time.time() - t0, 2), "bytes": db.stat().st_size, "path": str(db)}


# ----------------------------------------------------------------------------- search

def _terms(query: str) -> list[str]:
    """Distinct lower-case words of a query minus stop words (all of them if only stop words)."""
    words = [w.lower() for w in _WORD.findall(query)]
    return list(dict.fromkeys([w for w in words if w not in STOP_WORDS] or words))[:MAX_QUERY_TERMS]


def fts_query(query: str) -> str:
    """Free text -> a safe FTS5 query: quoted word tokens OR-ed ("" when there are none)."""
    return " OR ".join(f'"{w}"' for w in _terms(query))


def other_number(word: str) -> str:
    """The plural of a singular noun and the other way round, by spelling: "expressions" ->
    "expression", "slicing" -> "slicings", "class" -> "classes", "library" -> "libraries"."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def title_candidates(query: str) -> list[str]:
    """Title keys a query may name: its identifiers; all of its non-stop words together, and again
    without CONTEXT_WORDS ("slicing in Python" -> "slicing"); each of those with its last word in the
    other number ("regular expressions" -> "regular expression", "slicing" -> "slicings") unless it
    is part of an identifier."""
    terms = _terms(query)
    topic = [w for w in terms if w not in CONTEXT_WORDS]
    phrases = [terms] + ([topic] if topic and topic != terms else [])
    idents = _IDENT.findall(query)
    named = {w.lower() for m in idents for w in _WORD.findall(m)}  # json.dumps is not json.dump
    keys = [title_key(m) for m in idents]
    for words in phrases:
        keys.append(title_key(" ".join(words)))
        if words and words[-1] not in named:
            keys.append(title_key(" ".join([*words[:-1], other_number(words[-1])])))
    return [k for k in dict.fromkeys(keys) if k]


def construct_keywords(query: str, title_keys: list[str] | None = None) -> list[str]:
    """Python keywords the query names as a construct: "How does the for statement work?" -> ["for"].
    They are title keys within PYTHON_SOURCES only; those already among `title_keys` (default: the
    query's `title_candidates`) are left out."""
    words = [w.lower() for w in _WORD.findall(query)]
    found = [w for w, after in zip(words, words[1:]) if w in PYTHON_KEYWORDS and after in CONSTRUCT_WORDS]
    taken = title_candidates(query) if title_keys is None else title_keys
    return [k for k in dict.fromkeys(found) if k not in taken]


class Index:
    """A read-only view of an index built by `build_index`; safe to share between threads."""

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"retrieval index {self.path} not found: build one with `builder index build`")
        self._con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        try:
            self.meta = {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta")}
            self._con.execute("SELECT rowid FROM fts WHERE fts MATCH 'x' LIMIT 1").fetchall()
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            self._con.close()
            raise ValueError(f"{self.path} is not a usable retrieval index ({e}): rebuild it with "
                             "`builder index build`") from None
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            self._con.close()
            raise ValueError(f"{self.path} has index schema {self.meta.get('schema_version')}, this code reads "
                             f"{SCHEMA_VERSION}: rebuild it with `builder index build`")
        self._lock = threading.Lock()  # one connection; sqlite3 cursors must not interleave

    def __len__(self) -> int:
        return int(self.meta["passages"])

    def close(self) -> None:
        self._con.close()

    def _rows(self, sql: str, args: list) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    def get(self, passage_id: str) -> Passage | None:
        rows = self._rows("SELECT id, title, source, origin, text FROM passages WHERE id = ?", [passage_id])
        return Passage(*rows[0]) if rows else None

    def search(self, query: str, k: int = 3, sources: tuple[str, ...] | None = None) -> list[Passage]:
        """The `k` best passages for free text, at most one per record; [] when nothing matches."""
        match = fts_query(query)
        if not match or k <= 0 or (sources is not None and not sources):
            return []
        where, args = "", []
        if sources is not None:
            where, args = f" AND source IN ({_marks(sources)})", list(sources)
        bm25 = f"bm25(fts, {TITLE_WEIGHT}, {TEXT_WEIGHT})"
        ranked: list[tuple[int, float]] = []  # (rowid, bm25), best first; lower bm25 is better
        keys = title_candidates(query)
        exact = self._rows(f"SELECT rowid, source FROM passages WHERE title_key IN ({_marks(keys)}) "
                           f"AND chunk = 0{where} LIMIT 500", [*keys, *args])
        if keywords := construct_keywords(query, keys):
            exact += self._rows(f"SELECT rowid, source FROM passages WHERE title_key IN ({_marks(keywords)}) "
                                f"AND chunk = 0 AND source IN ({_marks(PYTHON_SOURCES)}){where} LIMIT 500",
                                [*keywords, *PYTHON_SOURCES, *args])
        if exact:  # the best first passage per source, sources in SOURCE_ORDER
            source_of = dict(exact)
            best: dict[str, tuple[int, float]] = {}
            for rowid, s in self._rows(f"SELECT rowid, {bm25} AS s FROM fts WHERE fts MATCH ? "
                                       f"AND rowid IN ({_marks(source_of)}) ORDER BY s", [match, *source_of]):
                best.setdefault(source_of[rowid], (rowid, s))
            order = {name: i for i, name in enumerate(SOURCE_ORDER)}
            ranked += [best[name] for name in sorted(best, key=lambda n: order.get(n, -1))]
        # fetch more than k: passages of one record collapse into one below
        inner = f"SELECT rowid, {bm25} AS s FROM fts WHERE fts MATCH ?"
        if sources is None:
            ranked += self._rows(f"{inner} ORDER BY s LIMIT ?", [match, 4 * k + 8])
        else:  # filter before the cut, or a small source would be crowded out of the top rows
            ranked += self._rows(f"SELECT f.rowid, f.s FROM ({inner}) f JOIN passages p ON p.rowid = f.rowid "
                                 f"WHERE 1{where} ORDER BY f.s LIMIT ?", [match, *args, 4 * k + 8])
        rows = self._rows(f"SELECT rowid, id, title, source, origin, text FROM passages "
                          f"WHERE rowid IN ({_marks(ranked)})", [r for r, _ in ranked])
        by_rowid = {r[0]: r[1:] for r in rows}
        out: dict[str, Passage] = {}  # record id -> its first (best) passage
        for rowid, s in ranked:
            p = Passage(*by_rowid[rowid], score=round(-s, 4))
            out.setdefault(p.id.rsplit("#", 1)[0], p)
        return list(out.values())[:k]


def _marks(items) -> str:
    return ", ".join("?" * len(items))
