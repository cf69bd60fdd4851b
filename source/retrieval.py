"""Retrieval: BM25 search with citation ids over the static index folder `retrieval_build` writes.

This is the one retrieval of the project: `builder sft-data`, `builder eval`, the export gates and
`supermix` call `Index.search`, and web_static/retrieval.js is its JavaScript port, step for step
(tests/test_retrieval_parity.py checks docs, order and scores on hundreds of queries).
The query of a conversation is `source.prompt.retrieval_query` (a follow-up carries the turn before).

Design choices:
- BM25F over two fields: a word in the title counts TITLE_WEIGHT times one in the text (k1 1.2,
  b 0.5, length = all words, idf floored at 1e-6): SQLite FTS5's bm25() formula, then times the
  square root of the share of the query's idf the passage matches (coverage). Without it one rare
  word can carry a passage that misses the rest of the question ("folder" in a mailbox method
  outranking "delete ... directory tree"); sqrt is exact in both languages, a general power is not.
- Priors, one factor per passage on that score: its group's weight (a source, or one part of the
  Python manual: WordNet 0.7, its 117k senses title the common words of how-to questions, "folder",
  "flatten"; the manual 1.15, but its release notes and C-side parts 0.69, they describe changes and
  the C API, not how to use Python) times 1 + MENTION_PRIOR x ln(1 + the manual sections that
  mention a docstring's API), so os.walk beats mailbox.Maildir on "folder" words. The build stores
  the parts (meta.json's groups, group_weights and mention_factor table; a group and a mention
  count per passage in docs.bin); readers multiply, never call log.
- Words are Unicode letters and digits, lower-cased, diacritics removed ("Naïve" -> "naive");
  "json.dumps" is the words "json" "dumps". Stop words are dropped unless nothing else is left.
- Stems come from the index ("w" in the term shards): the build stemmed every corpus word, so
  readers look words up and never stem themselves (see retrieval_build).
- Names win: a record goes by its title and the other names the build found (a heading, FOLDOC's
  "also", WordNet's synonyms). When the query spells one (its identifiers as written, "json.dumps";
  any run of up to four of its words, content words stemmed), the record gains a name bonus:
  name_bonus x (idf of the name's words - ln(records sharing the name)) x (the name's share of the
  query's idf). A rare name that is most of the question wins; a common word among many hardly counts.
- At most one passage per record (its best), so the top 3 are three sources.
- Scores are float64 computed in the same order as the JavaScript port, so both are bit-identical;
  ties go to the lower doc number. numpy does the per-word arithmetic over whole posting lists.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMAT = "supermix-bm25-v4"
K1, B = 1.2, 0.5  # b below BM25's usual 0.75: see source/retrieval_build.py on borrowed words
TITLE_WEIGHT, TEXT_WEIGHT = 5.0, 1.0
ANCHOR_WEIGHT = 0.5  # a word of the heading of a manual section that mentions a docstring's API
FREQ_SCALE = 2  # stored frequencies are weight x this (integers); readers divide it back out
PASSAGES_PER_SHARD = 500
# a passage's group is its source, or "python-docs/<part>" for a part of the manual (its top folder);
# a group not listed takes its source's weight, a source not listed 1. Tuned on the natural set's even lines.
GROUP_WEIGHTS = {"wordnet": 0.7, "python-docs": 1.15, "python-docs/whatsnew": 0.69, "python-docs/c-api": 0.69,
                 "python-docs/extending": 0.69, "python-docs/distutils": 0.69}
MENTION_PRIOR = 0.1  # a docstring's score x (1 + this x ln(1 + manual sections mentioning its API))
MAX_MENTIONS = 255  # mention counts are one byte in docs.bin
DEFAULT_EXCLUDED = ("chitchat",)  # casual chat is training text, not something to cite
MAX_QUERY_TERMS = 32  # a pasted page should not turn into a 500-term query
STOP_WORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below
between both but by can could did do does doing done down during each either else few for from
further had has have having he her here hers him his how i if in into is it its itself just me
more most my no nor not of off on once only or other our out over own please same she should so
some such than that the their them then there these they this those through to too under until up
us very was we were what when where which while who whom why will with would you your
define definition defined meaning mean means explain describe tell show give example examples
""".split())  # the last line: words that ask for a definition rather than name a topic
# Docstring titles name where a function lives; people name it as they import it.
KEY_ALIASES = (("builtins", ""), ("posixpath", "os path"))
ARTICLES = frozenset(("the", "a", "an"))  # a name's leading article is not part of its key
NAME_BONUS = 2.0  # a passage whose name the query spells gains this times the idf of the name's words
MAX_NAME_WORDS = 4  # longest run of query words looked up as a name
MAX_NAME_QUERY_WORDS = 32  # names are looked up among the first this many words of a query

_WORD = re.compile(r"[^\W_]+")
_IDENT = re.compile(r"\w+(?:\.\w+)+|\w*_\w*")  # json.dumps, os.path.join, skip_keys


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


def words(text: str) -> list[str]:
    """Lower-case words with diacritics removed ("Naïve" -> "naive")."""
    text = unicodedata.normalize("NFD", text.lower())
    return _WORD.findall("".join(c for c in text if not unicodedata.category(c).startswith("M")))


def aliased_words(title: str, aliases=KEY_ALIASES) -> list[str]:
    """A title's words with an import alias applied: "builtins.str.zfill" -> ["str", "zfill"]."""
    ws = words(title)
    for prefix, alias in aliases:
        if ws[:1] == [prefix]:
            return alias.split() + ws[1:]
    return ws


def content_words(query: str, stop_words: frozenset[str] = STOP_WORDS, limit: int = MAX_QUERY_TERMS) -> list[str]:
    """Distinct query words minus stop words (all of them if only stop words), at most `limit`."""
    ws = words(query)
    return list(dict.fromkeys([w for w in ws if w not in stop_words] or ws))[:limit]


def shard_of(key: str, shards: int) -> int:
    """FNV-1a 32-bit of the UTF-8 bytes, modulo the shard count (the same function is in retrieval.js)."""
    h = 0x811C9DC5
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % shards


def _varints(buf: np.ndarray) -> np.ndarray:
    """All LEB128 varints of a uint8 array, decoded at once."""
    ends = np.flatnonzero(buf < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    shift = 7 * (np.arange(len(buf)) - np.repeat(starts, ends - starts + 1))
    return np.add.reduceat((buf & 0x7F).astype(np.int64) << shift, starts)


class Index:
    """A read-only index folder; `search` is safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if self.path.is_file():
            raise ValueError(f"{self.path} is a file, not an index folder (an index from an older version?): "
                             "rebuild it with `builder index build`")
        if not meta_file.is_file():
            raise FileNotFoundError(f"retrieval index {self.path} not found: build one with `builder index build`")
        try:
            self.meta = json.loads(meta_file.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file} is not a usable index ({e}): rebuild it with `builder index build`") from None
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} has index format {self.meta.get('format')!r}, this code reads {FORMAT}: "
                             "rebuild it with `builder index build`")
        n = self.meta["docs"]
        raw = (self.path / "docs.bin").read_bytes()
        if len(raw) != 7 * n:
            raise ValueError(f"{self.path / 'docs.bin'}: {len(raw)} bytes, expected {7 * n}: rebuild the index")
        self.lengths = np.frombuffer(raw, "<u2", n, 0).astype(np.float64)
        self.chunks = np.frombuffer(raw, "<u2", n, 2 * n).astype(np.int64)
        self.source_of = np.frombuffer(raw, np.uint8, n, 4 * n)
        mentions = np.frombuffer(raw, np.uint8, n, 5 * n)
        group = np.frombuffer(raw, np.uint8, n, 6 * n)
        # one float64 product per passage, the same one retrieval.js forms: group weight x mention factor
        self.prior = (np.array(self.meta["group_weights"], np.float64)[group]
                      * np.array(self.meta["mention_factor"], np.float64)[mentions])
        # the constants the index was built with, so this reader and retrieval.js agree on every file
        self.stop_words = frozenset(self.meta["stop_words"])
        self.articles = frozenset(self.meta["articles"])
        self.aliases = [tuple(a) for a in self.meta["key_aliases"]]
        self._shards: dict[int, tuple[dict, np.ndarray, int]] = {}
        self._texts: dict[int, list] = {}
        self._keys: dict[int, dict] = {}
        self._doc_of: dict[str, int] | None = None  # passage id -> doc, built by the first `get`
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.meta["docs"])

    def close(self) -> None:
        """Nothing to release (files are read per shard); kept so callers can treat indexes as resources."""

    def _shard(self, s: int) -> tuple[dict, np.ndarray, int]:
        with self._lock:
            if s not in self._shards:
                data = (self.path / "terms" / f"{s:03d}.bin").read_bytes()
                size = struct.unpack_from("<I", data)[0]
                self._shards[s] = (json.loads(data[4:4 + size].decode("utf-8")), np.frombuffer(data, np.uint8), 4 + size)
            return self._shards[s]

    def _head(self, key: str) -> dict:
        return self._shard(shard_of(key, self.meta["term_shards"]))[0]

    def stem(self, word: str) -> str:
        return self._head(word)["w"].get(word, word)

    def postings(self, stem: str) -> tuple[float, np.ndarray, np.ndarray]:
        """(idf, docs, weighted frequencies) of one stem; empty arrays when no passage has it."""
        head, data, base = self._shard(shard_of(stem, self.meta["term_shards"]))
        if stem not in head["t"]:
            return 0.0, np.zeros(0, np.int64), np.zeros(0, np.int64)
        df, offset, size, idf = head["t"][stem]
        pairs = _varints(data[base + offset:base + offset + size])
        return idf, np.cumsum(pairs[0::2]), pairs[1::2] / self.meta["freq_scale"]

    def scores(self, query: str, coverage: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(docs, scores) of every doc matching a query stem, docs ascending: BM25F times the square
        root of the share of the query's idf the doc matches, times the doc's prior (plain BM25F, no
        coverage and no prior, with coverage=False, for benchmarks/retrieval.py)."""
        k1, b, avgdl = self.meta["k1"], self.meta["b"], self.meta["avgdl"]
        total = np.zeros(len(self))
        covered = np.zeros(len(self))
        query_idf = 0.0
        for stem in dict.fromkeys(self.stem(w) for w in self._content_words(query)):
            idf, docs, f = self.postings(stem)
            norm = k1 * (1 - b + b * self.lengths[docs] / avgdl)
            total[docs] += idf * (f * (k1 + 1)) / (f + norm)
            covered[docs] += idf
            query_idf += idf
        docs = np.flatnonzero(covered)
        if not coverage:
            return docs, total[docs]
        return docs, total[docs] * np.sqrt(covered[docs] / query_idf) * self.prior[docs]

    def name_keys(self, query: str) -> list[tuple[str, list[str]]]:
        """(key, content stems) for every name the query may spell: its identifiers as written
        ("=json dumps"), and each run of up to MAX_NAME_WORDS words that holds a content word and does
        not open with an article, content words stemmed ("regular expressions" -> "regular express")."""
        out = []
        for m in _IDENT.findall(query):
            ws = aliased_words(m, self.aliases)
            out.append(("=" + " ".join(ws), [self.stem(w) for w in ws if w not in self.stop_words]))
        ws = words(query)[:self.meta["max_name_query_words"]]
        stems = [w if w in self.stop_words else self.stem(w) for w in ws]
        for i in range(len(ws)):
            if ws[i] in self.articles:
                continue
            for j in range(i + 1, min(i + self.meta["max_name_words"], len(ws)) + 1):
                content = [st for w, st in zip(ws[i:j], stems[i:j]) if w not in self.stop_words]
                if content:
                    out.append((" ".join(stems[i:j]), content))
        return list({k: c for k, c in out}.items())

    def named(self, query: str) -> dict[int, float]:
        """doc -> the name bonus of the best name it goes by that the query spells: NAME_BONUS x
        (idf of the name's words - ln(records sharing the name)) x (share of the query's idf they hold).
        A rare name that is most of the question ("ostensibly", "slicing in python") counts; a common
        word among many ("a list of the files in a folder") hardly does."""
        out: dict[int, float] = {}
        total = 0.0
        for w in dict.fromkeys(self.stem(w) for w in self._content_words(query)):
            total += self._idf(w)
        for key, content in self.name_keys(query):
            entry = self._key_shard(key).get(key)
            if not entry:
                continue
            log_count, docs = entry
            idf = 0.0
            for st in content:
                idf += self._idf(st)
            bonus = self.meta["name_bonus"] * max(0.0, idf - log_count) * idf / total
            for d in docs:
                if bonus > out.get(d, 0.0):
                    out[d] = bonus
        return out

    def _content_words(self, query: str) -> list[str]:
        return content_words(query, self.stop_words, self.meta["max_query_terms"])

    def _idf(self, stem: str) -> float:
        entry = self._head(stem)["t"].get(stem)
        return entry[3] if entry else 0.0

    def _key_shard(self, key: str) -> dict:
        s = shard_of(key, self.meta["key_shards"])
        with self._lock:
            if s not in self._keys:
                self._keys[s] = json.loads((self.path / "keys" / f"{s:03d}.json").read_text("utf-8"))
            return self._keys[s]

    def ranked(self, query: str, k: int = 3, sources: tuple[str, ...] | None = None) -> list[tuple[int, float]]:
        """(doc, score) of the best 4k+8 docs, best first: BM25 plus the name bonus."""
        docs, scores = self.scores(query)
        named = self.named(query) if len(docs) else {}
        if named:
            extra = np.array(sorted(named), dtype=np.int64)
            all_docs = np.union1d(docs, extra)
            total = np.zeros(len(all_docs))
            total[np.searchsorted(all_docs, docs)] = scores
            total[np.searchsorted(all_docs, extra)] += np.array([named[d] for d in extra.tolist()])
            docs, scores = all_docs, total
        if sources is not None:
            allowed = np.isin(self.source_of[docs], [i for i, s in enumerate(self.meta["sources"]) if s in sources])
            docs, scores = docs[allowed], scores[allowed]
        if not len(docs) or k <= 0:
            return []
        top = np.lexsort((docs, -scores))[:4 * k + 8]
        return list(zip(docs[top].tolist(), scores[top].tolist()))

    def passage(self, doc: int) -> Passage:
        per = self.meta["passages_per_shard"]
        s = doc // per
        with self._lock:
            if s not in self._texts:
                self._texts[s] = json.loads((self.path / "text" / f"{s:03d}.json").read_text("utf-8"))
            pid, title, src, origin, text = self._texts[s][doc % per]
        return Passage(pid, title, self.meta["sources"][src], self.meta["origins"][origin], text)

    def get(self, passage_id: str) -> Passage | None:
        """The passage with this id ("docstring:json.dumps#0"), or None. The first call reads every
        text shard once to map ids to docs (about a second for the default corpus)."""
        with self._lock:
            if self._doc_of is None:
                per, doc_of = self.meta["passages_per_shard"], {}
                for s in range(self.meta["text_shards"]):
                    rows = json.loads((self.path / "text" / f"{s:03d}.json").read_text("utf-8"))
                    doc_of.update((row[0], s * per + i) for i, row in enumerate(rows))
                self._doc_of = doc_of
        doc = self._doc_of.get(passage_id)
        return None if doc is None else self.passage(doc)

    def search(self, query: str, k: int = 3, sources: tuple[str, ...] | None = None) -> list[Passage]:
        """The `k` best passages for free text, at most one per record; [] when nothing matches.
        `sources` keeps only those sources (the browser port has no such filter)."""
        out: dict[int, Passage] = {}  # record's first doc -> its best passage
        for doc, score in self.ranked(query, k, sources):
            record = doc - int(self.chunks[doc])
            if record not in out:
                p = self.passage(doc)
                p.score = round(score, 4)
                out[record] = p
            if len(out) == k:
                break
        return list(out.values())
